"""Where weights come from: safetensors files (one or sharded), a GGUF file, or random.

Rule: weights stream one tensor at a time as (HF name, tensor) pairs, so peak memory stays
near the model's own size; the model maps names and copies into its parameters.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

import torch
from torch import nn

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Random weights: normal(0, std); norm scales stay near 1 so activations keep their size.
_DUMMY_STD = 0.02


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint files of an HF directory, in shard order, or ValueError."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(model_dir, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, n) for n in found]
    raise ValueError(
        f"No safetensors weights in {model_dir} (looked for {SAFETENSORS_FILE} and "
        f"{SAFETENSORS_INDEX}); convert the checkpoint to safetensors or pass "
        f"--load-format dummy for random weights."
    )


def safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from every shard, memory-mapped, one tensor at a time."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def fill_dummy(model: nn.Module, seed: int) -> None:
    """Seeded random weights from the config alone, reproducible across runs on one device
    type. Each parameter is drawn on its own device from a generator seeded by its name, so
    an 8B model fills in about a second on an accelerator instead of minutes on one host
    thread. A tensor-parallel parameter draws its FULL tensor and keeps its slice, and a
    pipeline stage's parameters keep their full-model names, so every tensor- and
    pipeline-parallel layout gives the same model."""
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(
            seed * 100_003 + zlib.crc32(name.encode()))
        full_shape = getattr(param, "full_shape", param.shape)
        values = torch.randn(full_shape, generator=gen, device=param.device,
                             dtype=torch.float32).mul_(_DUMMY_STD)
        if name.endswith("norm.weight"):
            values += 1.0
        load_full = getattr(param, "load_full", None)
        if load_full is not None:
            load_full(values)
        else:
            param.data.copy_(values)
