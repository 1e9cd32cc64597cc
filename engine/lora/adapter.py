"""Reading a peft LoRA adapter directory into this rank's weights for our layers.

Rule: an adapter is checked in full against the model when it is read, and every problem is
a `ValueError` that names the numbers (the API turns it into a 400): a rank above
--max-lora-rank, a target module the model lacks, a shape that does not match the base
model, a peft option this engine does not implement (DoRA, modules_to_save, trained biases,
embedding or lm_head targets, ...). Nothing is silently skipped. lora_dropout is fine: it
does nothing at inference.

peft names a projection by its HF module (`base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight`); ours stack q/k/v into `qkv_proj` and gate/up into `gate_up_proj`,
so each HF projection maps to one slice of our layer (`LoRATargets`). The weights read are
sharded the way the base layer shards (`Linear.lora_shard`) and the scaling (lora_alpha / r,
or / sqrt(r) with use_rslora) is folded into lora_B, in float32 before the cast.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from engine.messages.core import LoRARequest
from engine.models.layers.linear import Linear

# Our stacked layer -> the HF projections of its slices, in order (the model loader's
# stacking, seen from the other side).
PACKED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_REFUSED_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
# adapter_config.json options that change the math; refused unless at their no-op value.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "alpha_pattern": "per-module lora_alpha (alpha_pattern)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterConfig:
    """What adapter_config.json says that the math needs."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: Union[list[str], str, None]
    base_model_name_or_path: Optional[str]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class LoRAAdapter:
    """An adapter read for this rank, in host memory: our module name -> per slice of that
    layer, (A [r, in_local], B [out_local, r] scaled) or None where it is not targeted."""

    lora_int_id: int
    name: str
    rank: int
    weights: dict[str, list[Optional[tuple[torch.Tensor, torch.Tensor]]]]


class LoRATargets:
    """The model's LoRA-capable layers by our name, and where each HF projection name goes:
    HF module name -> (our module name, slice index, or None for the whole layer)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, Linear] = {}
        self.by_hf_name: dict[str, tuple[str, Optional[int]]] = {}
        # Layers another pipeline stage holds: their adapter weights are that stage's.
        self.elsewhere: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Identity) and name:
                self.elsewhere.append(name + ".")
            if not isinstance(module, Linear):
                continue
            self.layers[name] = module
            self.by_hf_name[name] = (name, None)
            parent, _, leaf = name.rpartition(".")
            slices = PACKED_MODULES.get(leaf, ())
            if len(slices) == len(module.lora_slice_sizes) > 1:
                for index, hf_leaf in enumerate(slices):
                    self.by_hf_name[f"{parent}.{hf_leaf}" if parent else hf_leaf] = (name, index)

    @property
    def leaf_names(self) -> list[str]:
        return sorted({name.rpartition(".")[2] for name in self.by_hf_name})

    def is_elsewhere(self, hf_module: str) -> bool:
        return any(hf_module.startswith(prefix) for prefix in self.elsewhere)


def read_adapter_config(path: str, max_rank: int) -> AdapterConfig:
    """adapter_config.json of the peft directory `path`, refused where we cannot run it."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json (a peft "
                         "directory, as save_pretrained writes it, is expected).")
    with open(file) as f:
        raw = json.load(f)
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"LoRA adapter {path!r} is a {peft_type} adapter; only LORA is "
                         "supported.")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise ValueError(f"LoRA adapter {path!r} uses {what}, which this engine does "
                             "not support; merge it into the model instead.")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r} trains biases (bias={raw['bias']!r}); only "
                         "bias='none' is supported.")
    rank = int(raw.get("r", 0))
    if rank < 1:
        raise ValueError(f"LoRA adapter {path!r} has rank r={rank}; it must be at least 1.")
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {path!r} has rank {rank}, above --max-lora-rank "
                         f"{max_rank}; raise --max-lora-rank to at least {rank}.")
    targets = raw.get("target_modules")
    _check_target_names(path, [targets] if isinstance(targets, str) else targets or [])
    return AdapterConfig(rank=rank, alpha=float(raw.get("lora_alpha", 8)),
                         use_rslora=bool(raw.get("use_rslora", False)),
                         target_modules=targets,
                         base_model_name_or_path=raw.get("base_model_name_or_path"))


def _check_target_names(path: str, targets: Iterable[str]) -> None:
    for target in targets:
        for refused in _REFUSED_TARGETS:
            if re.search(rf"(^|\W){refused}($|\W)", target):
                raise ValueError(f"LoRA adapter {path!r} targets {refused} (in "
                                 f"target_modules {target!r}); LoRA on embeddings or the "
                                 "LM head is not supported.")


def load_adapter(request: LoRARequest, targets: LoRATargets, max_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read `request.lora_path` for this rank's layers (host memory, `dtype`)."""
    path = request.lora_path
    config = read_adapter_config(path, max_rank)
    _check_listed_targets(path, config.target_modules, targets)
    pairs = _read_pairs(path)
    weights: dict[str, list[Optional[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for hf_module, (a, b) in sorted(pairs.items()):
        if hf_module not in targets.by_hf_name:
            if targets.is_elsewhere(hf_module):
                continue
            raise ValueError(
                f"LoRA adapter {path!r} targets module {hf_module!r}, which this model "
                f"does not have as a linear layer (LoRA-capable: "
                f"{', '.join(targets.leaf_names)}).")
        ours, index = targets.by_hf_name[hf_module]
        layer = targets.layers[ours]
        slots = weights.setdefault(ours, [None] * len(layer.lora_slice_sizes))
        indices = range(len(slots)) if index is None else [index]
        full_in, _ = layer.lora_full_shapes(indices[0])
        full_out = sum(layer.lora_full_shapes(i)[1] for i in indices)
        _check_shapes(path, hf_module, a, b, config.rank, full_in, full_out)
        b = b.float() * config.scaling
        parts = b.split([layer.lora_full_shapes(i)[1] for i in indices])
        for i, part in zip(indices, parts):
            a_local, b_local = layer.lora_shard(a, part, i)
            slots[i] = (a_local.to(dtype).contiguous(), b_local.to(dtype).contiguous())
    if not weights:
        raise ValueError(f"LoRA adapter {path!r} holds no LoRA weights for this model.")
    return LoRAAdapter(request.lora_int_id, request.lora_name, config.rank, weights)


def _check_listed_targets(path: str, listed: Union[list[str], str, None],
                          targets: LoRATargets) -> None:
    """Each name of a target_modules list must be a projection this model has (a regex
    string, as peft allows, is checked through the tensors it produced)."""
    if not isinstance(listed, list):
        return
    known = set(targets.leaf_names)
    for name in listed:
        if name.rpartition(".")[2] not in known:
            raise ValueError(
                f"LoRA adapter {path!r} targets module {name!r}, which this model does "
                f"not have as a linear layer (LoRA-capable: {', '.join(sorted(known))}).")


def _read_pairs(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name: (lora_A [r, in], lora_B [out, r])} from adapter_model.safetensors."""
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        bin_file = os.path.join(path, "adapter_model.bin")
        hint = (" (it has adapter_model.bin: pickled weights are not loaded; resave with "
                "safe_serialization=True)" if os.path.isfile(bin_file) else "")
        raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors{hint}.")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(file).items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            what = ("an embedding LoRA" if "lora_embedding" in name
                    else "a tensor that is not a LoRA A/B weight")
            raise ValueError(f"LoRA adapter {path!r} holds {name!r}, {what}; only LoRA on "
                             "linear layers is supported.")
        halves.setdefault(match["module"], {})[match["kind"]] = tensor
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {path!r} has {sorted(half)} for {module!r}; "
                             "both lora_A and lora_B are needed.")
        pairs[module] = (half["lora_A"], half["lora_B"])
    return pairs


def _check_shapes(path: str, module: str, a: torch.Tensor, b: torch.Tensor, rank: int,
                  full_in: int, full_out: int) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"LoRA adapter {path!r}: {module!r} has lora_A {tuple(a.shape)} and "
                         f"lora_B {tuple(b.shape)}; 2-D weights are expected.")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"LoRA adapter {path!r}: {module!r} has lora_A {tuple(a.shape)} and "
                         f"lora_B {tuple(b.shape)}, not rank {rank} as its config says.")
    if a.shape[1] != full_in or b.shape[0] != full_out:
        raise ValueError(
            f"LoRA adapter {path!r}: {module!r} maps {a.shape[1]} -> {b.shape[0]} features, "
            f"the base model's layer {full_in} -> {full_out}; the adapter was trained for "
            "another model.")
