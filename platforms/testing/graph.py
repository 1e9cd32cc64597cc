"""Conformance check for a platform's graph runner: what it replays equals the eager forward.

Rule: the check uses the contract only. It builds a small decoder-shaped model of its own
(embedding, per layer a norm, q/k/v projections, attention through the platform's own
backend over the platform's KV-cache tensors, an output projection and an MLP), hands its
forward and the backend to `platform.graph_runner`, lets the runner capture at warm-up,
then feeds decode-only and mixed batches of several sizes through the runner and through
the plain forward it wraps, and compares.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from platforms.config import ModelShape, PlatformConfig
from platforms.interface import AttentionBackend, AttentionSpec, CommonAttentionMetadata, Platform
from platforms.util import cdiv

# Batches checked: each is a list of (num_computed_tokens, num_new_tokens) per request.
DEFAULT_BATCHES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((7, 1),),  # one decode
    ((3, 1), (30, 1), (17, 1)),  # decodes, padded to a captured size
    tuple((i * 5 + 1, 1) for i in range(9)),  # more decodes than the smallest sizes
    ((0, 6), (12, 1), (4, 3)),  # mixed: prefill, decode, chunk over context
    ((0, 40),),  # one longer prefill
)

# A Llama of the same shape as `make_platform_config`'s, for plugin tests that run the
# whole engine on their platform (weights from load_format="dummy").
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


def make_platform_config(platform: Optional[Platform] = None, **overrides: Any
                         ) -> PlatformConfig:
    """A `PlatformConfig` for a small model, as the engine would build it: dtype is what the
    platform resolves for float32 weights (float32 without a platform), the rest small;
    `overrides` replace fields (`model=ModelShape(...)` for another shape)."""
    dtype = platform.resolve_dtype(torch.float32) if platform is not None else torch.float32
    fields: dict[str, Any] = dict(
        dtype=dtype,
        model=ModelShape(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=32, vocab_size=512),
        block_size=16, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=16,
        enforce_eager=False, kv_cache_memory=None, gpu_memory_utilization=0.9,
    )
    fields.update(overrides)
    return PlatformConfig(**fields)


def step_grad_mode(platform: Platform) -> contextlib.AbstractContextManager[Any]:
    """The no-grad mode the engine runs a step under on this platform."""
    return torch.inference_mode() if platform.capabilities.inference_mode else torch.no_grad()


class TinyDecoder(torch.nn.Module):
    """A random-weight decoder whose every attention call goes through `backend`; each
    layer's cache is a platform KV-cache tensor, filled with random context."""

    def __init__(self, platform: Platform, backend: AttentionBackend, shape: ModelShape,
                 num_blocks: int, dtype: torch.dtype, gen: torch.Generator) -> None:
        super().__init__()
        device = platform.device()
        h, d = shape.hidden_size, shape.head_dim
        self.shape, self.backend, self.scale = shape, backend, d ** -0.5

        def weight(*size: int) -> torch.nn.Parameter:
            w = torch.randn(*size, generator=gen) / size[-1] ** 0.5
            return torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)

        self.embed = weight(shape.vocab_size, h)
        self.layers = torch.nn.ModuleList()
        self.caches: list[torch.Tensor] = []
        for _ in range(shape.num_layers):
            layer = torch.nn.Module()
            layer.qkv = weight((shape.num_heads + 2 * shape.num_kv_heads) * d, h)
            layer.out = weight(h, shape.num_heads * d)
            layer.up = weight(2 * h, h)
            layer.down = weight(h, 2 * h)
            self.layers.append(layer)
            cache = platform.allocate_kv_cache(backend.kv_cache_shape(num_blocks), dtype,
                                               device)
            cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
            self.caches.append(cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        s = self.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        x = torch.nn.functional.embedding(input_ids, self.embed)
        # Positions enter so that a runner that replays stale positions is caught.
        x = x + (positions.to(x.dtype) * 1e-2)[:, None]
        for layer, cache in zip(self.layers, self.caches):
            h = torch.nn.functional.rms_norm(x, (s.hidden_size,))
            q, k, v = (h @ layer.qkv.T).split([q_size, kv_size, kv_size], dim=-1)
            attn = self.backend.forward(
                q.reshape(-1, s.num_heads, s.head_dim), k.reshape(-1, s.num_kv_heads, s.head_dim),
                v.reshape(-1, s.num_kv_heads, s.head_dim), cache, metadata, self.scale)
            x = x + attn.reshape(-1, q_size) @ layer.out.T
            h = torch.nn.functional.rms_norm(x, (s.hidden_size,))
            x = x + torch.nn.functional.silu(h @ layer.up.T) @ layer.down.T
        return x


def check_graph_runner(
    platform: Platform,
    *,
    dtype: Optional[torch.dtype] = None,
    batches: Sequence[Sequence[tuple[int, int]]] = DEFAULT_BATCHES,
    block_size: int = 16,
    num_blocks: int = 64,
    atol: Optional[float] = None,
    seed: int = 0,
    config: Optional[PlatformConfig] = None,
) -> float:
    """Raise AssertionError if the platform's graph runner disagrees with eager; return the
    largest absolute difference in hidden states seen. `dtype` defaults to what the
    platform resolves for float32 weights; `config` replaces `make_platform_config`'s."""
    if config is None:
        config = make_platform_config(platform, block_size=block_size,
                                      **({} if dtype is None else {"dtype": dtype}))
    dtype, shape = config.dtype, config.model
    gen = torch.Generator().manual_seed(seed)
    spec = AttentionSpec(num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                         head_size=shape.head_dim, dtype=dtype, block_size=config.block_size)
    backend = platform.attention_backend(spec)
    model = TinyDecoder(platform, backend, shape, num_blocks, dtype, gen)
    device = platform.device()
    graph_runner = platform.graph_runner(model.forward, config, (backend,))

    def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`n` one-token requests at position 0, all in block 0 (as the engine captures)."""
        qsl = torch.arange(n + 1, dtype=torch.int32)
        ones = torch.ones(n, dtype=torch.int32)
        common = CommonAttentionMetadata(
            num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=1,
            query_start_loc_cpu=qsl, seq_lens_cpu=ones,
            num_computed_tokens_cpu=torch.zeros(n, dtype=torch.int32),
            query_start_loc=qsl.to(device), seq_lens=ones.to(device),
            block_table=torch.zeros(n, 1, dtype=torch.int32, device=device),
            slot_mapping=(torch.arange(n, dtype=torch.int64) % config.block_size).to(device))
        zeros = torch.zeros(n, dtype=torch.int64, device=device)
        return zeros, zeros.clone(), backend.build_metadata(common)

    with step_grad_mode(platform):
        graph_runner.capture(make_batch)
    platform.synchronize()
    tol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    worst = 0.0
    for batch in batches:
        ids, positions, common = _batch(batch, config.block_size, num_blocks, device, gen,
                                        shape.vocab_size)
        with step_grad_mode(platform):
            # Eager first, then the runner: both write the same new keys/values to the
            # same slots, so the runner's attention reads what eager's read.
            want = graph_runner.forward(ids, positions, backend.build_metadata(common))
            got = graph_runner(ids, positions, backend.build_metadata(common))
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
