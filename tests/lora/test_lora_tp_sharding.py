"""An adapter shards like its base layer: with two tensor-parallel ranks, each rank's
column-parallel output (q/k/v with fewer KV heads than query heads, gate/up) is its slice
of the one-rank output, and the row-parallel outputs (o, down) are partial sums that add up
to it, adapter delta included (no extra collective). Built in one process: each rank's
model is loaded under its own ParallelContext (no communicator; the layers' outputs are
compared before any reduction would run)."""

from __future__ import annotations

import numpy as np
import torch

from engine.config import LoRAConfig
from engine.distributed import ParallelContext, use_parallel
from engine.engine_args import EngineArgs
from engine.lora import LoRAManager
from engine.models.loader.model_loader import load_model
from platforms import kernels
from tests.lora.conftest import ALL_TARGETS, make_adapter, request


def rank_model(base_dir, tp_rank: int, tp_size: int):
    model_config = EngineArgs(model=str(base_dir)).create_config().model
    with kernels.use_kernels(kernels.REFERENCE_TABLE), \
            use_parallel(ParallelContext(tp_rank=tp_rank, tp_size=tp_size)):
        model = load_model(model_config, "cpu", torch.float32)
        manager = LoRAManager(model, LoRAConfig(max_loras=2, max_lora_rank=8),
                              torch.device("cpu"), torch.float32, max_num_tokens=64)
    return model, manager


def test_tp2_shards_of_each_adapted_layer_make_the_one_rank_output(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=8, lora_alpha=16, target_modules=ALL_TARGETS)
    lora = request(1, tmp_path)
    full, *ranks = (rank_model(base_dir, r, s) for r, s in ((0, 1), (0, 2), (1, 2)))
    slots = np.array([0] * 5 + [-1] * 2 + [0] * 3)  # adapter tokens around base tokens
    for _, manager in (full, *ranks):
        manager.begin_step()
        assert manager.slot_of(lora) == 0
        manager.context.set_step(slots)
    torch.manual_seed(0)
    layer = lambda model, name: model.get_submodule(f"model.layers.1.{name}")  # noqa: E731
    with torch.no_grad():
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            x = torch.randn(len(slots), 64)
            whole = layer(full[0], name)
            expected = whole.split(whole(x))
            parts = [layer(model, name).split(layer(model, name)(x)) for model, _ in ranks]
            for index, want in enumerate(expected):  # per projection: rank 0's | rank 1's
                torch.testing.assert_close(torch.cat([p[index] for p in parts], -1), want)
        for name, width in (("self_attn.o_proj", 64), ("mlp.down_proj", 128)):
            x = torch.randn(len(slots), width)
            expected = layer(full[0], name)(x)
            partial = [layer(model, name)(chunk)
                       for (model, _), chunk in zip(ranks, x.chunk(2, dim=-1))]
            torch.testing.assert_close(partial[0] + partial[1], expected)
    # The delta is in there: the same layers without the adapter differ.
    full[1].context.set_step(np.full(len(slots), -1))
    with torch.no_grad():
        assert (layer(full[0], "mlp.down_proj")(x) - expected).abs().max() > 1e-3
