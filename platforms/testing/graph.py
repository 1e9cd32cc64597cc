"""Conformance check for a platform's graph runner: what it replays equals the eager forward.

Rule: the check builds a small random-weight Llama through the engine's own model runner on
the platform (so the runner sees real layers, its own attention backend and its own kernel
table), lets the runner capture at warm-up, then feeds decode-only and mixed batches of
several sizes through the runner and through the plain forward it wraps, and compares.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from platforms.interface import CommonAttentionMetadata, Platform
from platforms.util import cdiv

# Batches checked: each is a list of (num_computed_tokens, num_new_tokens) per request.
DEFAULT_BATCHES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((7, 1),),  # one decode
    ((3, 1), (30, 1), (17, 1)),  # decodes, padded to a captured size
    tuple((i * 5 + 1, 1) for i in range(9)),  # more decodes than the smallest sizes
    ((0, 6), (12, 1), (4, 3)),  # mixed: prefill, decode, chunk over context
    ((0, 40),),  # one longer prefill
)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "head_dim": 32, "torch_dtype": "float32",
}


def write_tiny_llama(directory: Path, **overrides: object) -> Path:
    """A config-only HF directory for a tiny Llama (weights come from load_format dummy)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY_LLAMA, **overrides}))
    return directory


def check_graph_runner(
    platform: Platform,
    model_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    batches: Sequence[Sequence[tuple[int, int]]] = DEFAULT_BATCHES,
    block_size: int = 16,
    num_blocks: int = 64,
    atol: Optional[float] = None,
    seed: int = 0,
) -> float:
    """Raise AssertionError if the platform's graph runner disagrees with eager; return the
    largest absolute difference in hidden states seen."""
    from engine.engine_args import EngineArgs
    from engine.engine_core.core import resolve_for_platform
    from engine.worker.model_runner import ModelRunner

    config = EngineArgs(
        model=str(model_dir), load_format="dummy", device=platform.name, block_size=block_size,
        num_kv_blocks=num_blocks, max_model_len=256, enforce_eager=False,
    ).create_config()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))
    config = resolve_for_platform(config, platform)
    runner = ModelRunner(config, platform)
    runner.load_model()
    runner.initialize_kv_cache(num_blocks)
    gen = torch.Generator().manual_seed(seed)
    assert runner.model is not None
    for module in runner.model.modules():  # context the batches read: random, not zeros
        cache = getattr(module, "kv_cache", None)
        if cache is not None:
            cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    runner.warm_up()
    graph_runner = runner.forward
    tol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    worst = 0.0
    for batch in batches:
        ids, positions, common = _batch(batch, block_size, num_blocks, runner.device, gen,
                                        config.model.vocab_size)
        with platform.inference_context():
            metadata = runner.attn_backend.build_metadata(common)
            got = graph_runner(ids, positions, metadata)
            metadata = runner.attn_backend.build_metadata(common)
            want = graph_runner.forward(ids, positions, metadata)
        platform.synchronize()
        if got.shape != want.shape:
            raise AssertionError(
                f"batch {list(batch)}: graph runner returned shape {tuple(got.shape)}, eager "
                f"{tuple(want.shape)} (a runner must return rows for the real tokens only)"
            )
        err = float((got.float() - want.float()).abs().max().cpu())
        worst = max(worst, err)
        if not err <= tol:
            raise AssertionError(
                f"batch {list(batch)}: graph runner differs from eager by max abs {err:.3g} > "
                f"{tol:.3g} (captured sizes {graph_runner.captured_sizes})"
            )
    return worst


def _batch(
    batch: Sequence[tuple[int, int]], block_size: int, num_blocks: int, device: torch.device,
    gen: torch.Generator, vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, CommonAttentionMetadata]:
    """Flat inputs and metadata for `batch`, each request on its own shuffled blocks."""
    seq_lens = [c + n for c, n in batch]
    max_blocks = max(cdiv(s, block_size) for s in seq_lens)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays scratch
    table = torch.zeros(len(batch), max_blocks, dtype=torch.int32)
    slots, positions, pos = [], [], 0
    for i, (computed, new) in enumerate(batch):
        count = cdiv(seq_lens[i], block_size)
        table[i, :count] = perm[pos:pos + count].to(torch.int32)
        pos += count
        for p in range(computed, computed + new):
            slots.append(int(table[i, p // block_size]) * block_size + p % block_size)
            positions.append(p)
    counts = [n for _, n in batch]
    qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    n_tokens = int(qsl[-1])
    common = CommonAttentionMetadata(
        num_reqs=len(batch), num_actual_tokens=n_tokens, max_query_len=max(counts),
        max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq,
        num_computed_tokens_cpu=torch.tensor([c for c, _ in batch], dtype=torch.int32),
        query_start_loc=qsl.to(device), seq_lens=seq.to(device), block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device),
    )
    ids = torch.randint(0, vocab, (n_tokens,), generator=gen).to(device)
    return ids, torch.tensor(positions, dtype=torch.int64).to(device), common
