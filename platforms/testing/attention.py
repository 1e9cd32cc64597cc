"""Conformance check for a platform's attention backend against a float64 reference.

Rule: the check uses only the contract (`kv_cache_shape`, `build_metadata`, `forward`), never
a backend's cache layout. Cached context is written by the backend itself in a first step,
then a second step mixes prefill chunks (with and without context) and decodes over
non-contiguous blocks; both steps are compared with plain softmax attention over unpaged
K/V computed in float64.

Sliding windows and logits soft-caps (the features a platform lists in
`Capabilities.attention_features`) are checked the same way, with decode steps after the
mixed one, and the window's stale-block rule is enforced: before each step the blocks that
lie wholly before the first key any query of the step attends are filled with NaN (the
engine may have handed them to another request), so a backend that reads them, even to mask
them out, fails. The block dimension is found from `kv_cache_shape` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from platforms.interface import (
    AttentionSpec,
    CommonAttentionMetadata,
    Platform,
    attention_features,
)


@dataclass(frozen=True)
class AttentionCase:
    num_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def id(self) -> str:
        return f"h{self.num_heads}-kv{self.num_kv_heads}-d{self.head_size}"


@dataclass(frozen=True)
class AttentionFeatureCase:
    """A window and/or a soft-cap, with requests chosen to cross the window."""

    sliding_window: Optional[int]
    logits_soft_cap: Optional[float]
    requests: tuple[tuple[int, int], ...]
    block_size: int = 16
    num_decode_steps: int = 2

    @property
    def features(self) -> frozenset[str]:
        return attention_features(self.sliding_window, self.logits_soft_cap)

    @property
    def id(self) -> str:
        return f"w{self.sliding_window}-cap{self.logits_soft_cap}-b{self.block_size}"


# GQA ratios 1, 2, 4 times head sizes 64 and 128.
ATTENTION_CASES: tuple[AttentionCase, ...] = tuple(
    AttentionCase(2 * ratio, 2, head_size) for ratio in (1, 2, 4) for head_size in (64, 128)
)

# (num_computed_tokens, num_new_tokens) per request of the checked step, deliberately
# unsorted: fresh prefill, decode, chunk over cached context, single-token prompt,
# block-aligned chunk, long decode.
DEFAULT_REQUESTS: tuple[tuple[int, int], ...] = (
    (0, 37), (21, 1), (40, 19), (0, 1), (16, 16), (5, 1), (70, 1), (3, 9),
)

# Requests that cross a window of 24 keys (16-token blocks): a fresh prompt longer than the
# window, chunks over cached context that reaches past it (one block-aligned), decodes right
# at its edge (positions 23, 24), past it by a block or more, and short ones inside it.
WINDOW_REQUESTS: tuple[tuple[int, int], ...] = (
    (0, 70), (40, 19), (23, 1), (24, 1), (100, 1), (5, 1), (64, 32), (47, 1), (3, 9),
)
FEATURE_CASES: tuple[AttentionFeatureCase, ...] = (
    AttentionFeatureCase(24, None, WINDOW_REQUESTS),
    AttentionFeatureCase(None, 5.0, DEFAULT_REQUESTS, num_decode_steps=1),
    AttentionFeatureCase(24, 5.0, WINDOW_REQUESTS),
    # A window shorter than a block, and one of a single key (the query itself).
    AttentionFeatureCase(7, None, WINDOW_REQUESTS, block_size=8),
    AttentionFeatureCase(1, None, ((0, 20), (30, 1), (9, 4))),
    # Blocks larger than the window, so the first needed block is often partly before it.
    AttentionFeatureCase(20, 30.0, WINDOW_REQUESTS, block_size=32),
)


def supported_feature_cases(platform: Platform) -> tuple[AttentionFeatureCase, ...]:
    """The FEATURE_CASES whose features `platform` lists in its capabilities."""
    listed = platform.capabilities.attention_features
    return tuple(c for c in FEATURE_CASES if c.features <= listed)


def check_attention_features(platform: Platform, case: AttentionCase,
                             feature_case: AttentionFeatureCase, **kwargs) -> float:
    """`check_attention_against_reference` with a feature case's window, cap, requests,
    block size and decode steps."""
    return check_attention_against_reference(
        platform, case, block_size=feature_case.block_size, requests=feature_case.requests,
        sliding_window=feature_case.sliding_window,
        logits_soft_cap=feature_case.logits_soft_cap,
        num_decode_steps=feature_case.num_decode_steps, **kwargs)


_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check_attention_against_reference(
    platform: Platform,
    case: AttentionCase,
    *,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    requests: Sequence[tuple[int, int]] = DEFAULT_REQUESTS,
    seed: int = 0,
    atol: Optional[float] = None,
    sliding_window: Optional[int] = None,
    logits_soft_cap: Optional[float] = None,
    num_decode_steps: int = 0,
) -> float:
    """Run two steps (then `num_decode_steps` steps of one more token per request) through
    `platform`'s backend and raise AssertionError on a mismatch. With a window, the blocks
    before each step's window hold NaN.

    Returns the largest absolute error seen, so callers can report it.
    """
    gen = torch.Generator().manual_seed(seed)
    spec = AttentionSpec(case.num_heads, case.num_kv_heads, case.head_size, dtype, block_size,
                         sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    missing = spec.features - platform.capabilities.attention_features
    if missing:
        raise ValueError(f"{platform.name} does not list {sorted(missing)} in "
                         "capabilities.attention_features; the kit checks listed features only")
    backend = platform.attention_backend(spec)
    device = platform.device()
    seq_lens = [computed + new + num_decode_steps for computed, new in requests]
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    # Extra blocks stay unused so a backend reading the wrong block meets garbage, not zeros.
    num_blocks = sum(blocks_per_req) + 7
    tables = _random_block_tables(blocks_per_req, num_blocks, gen)
    kv_cache = (torch.randn(backend.kv_cache_shape(num_blocks), generator=gen) * 10).to(
        device=device, dtype=dtype
    )
    # Full per-request q/k/v in float64; the steps feed slices of them.
    qkv = [_random_qkv(s, case, gen) for s in seq_lens]
    scale = case.head_size**-0.5
    tol = atol if atol is not None else _TOLERANCE.get(dtype, 3e-2)

    steps = [("context step", [(i, 0, c) for i, (c, _) in enumerate(requests) if c > 0]),
             ("mixed step", [(i, c, n) for i, (c, n) in enumerate(requests)])]
    steps += [(f"decode step {d + 1}", [(i, c + n + d, 1) for i, (c, n) in enumerate(requests)])
              for d in range(num_decode_steps)]
    block_dim = _block_dim(backend)
    worst = 0.0
    for name, step in steps:
        if not step:
            continue
        if sliding_window is not None:
            stale = _stale_blocks(step, tables, block_size, sliding_window)
            if stale.numel():
                kv_cache.index_fill_(block_dim, stale.to(device), float("nan"))
        out = _run_step(backend, step, qkv, tables, kv_cache, block_size, dtype, device, scale)
        row = 0
        for req, start, count in step:
            q, k, v = qkv[req]
            expected = _reference(q[start:start + count], k[:start + count],
                                  v[:start + count], start, scale, sliding_window,
                                  logits_soft_cap)
            got = out[row:row + count].to("cpu", torch.float64)
            err = float((got - expected).abs().max())
            worst = max(worst, err)
            if not err <= tol:  # also catches NaN
                raise AssertionError(
                    f"{name}, case {case.id}, request {req} (context {start}, new {count}, "
                    f"window {sliding_window}, soft-cap {logits_soft_cap}): "
                    f"max abs error {err:.3g} > {tol:.3g} vs the float64 reference"
                )
            row += count
    return worst


def _block_dim(backend) -> int:
    """The dimension of the backend's cache tensor that counts blocks."""
    one, two = backend.kv_cache_shape(1), backend.kv_cache_shape(2)
    dims = [d for d, (a, b) in enumerate(zip(one, two)) if a != b]
    if len(dims) != 1:
        raise AssertionError(f"kv_cache_shape: no single block dimension in {one} vs {two}")
    return dims[0]


def _stale_blocks(step, tables: torch.Tensor, block_size: int, window: int) -> torch.Tensor:
    """Block ids lying wholly before the first key any query of the step attends (a
    request's first query at position num_computed sees keys from num_computed - W + 1)."""
    stale = [tables[req, :max(0, computed - window + 1) // block_size]
             for req, computed, _ in step]
    return torch.cat(stale).long()


def _random_block_tables(
    blocks_per_req: list[int], num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """[num_reqs, max_blocks + 1] int32 of shuffled, disjoint block ids (0-padded)."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(blocks_per_req), max(blocks_per_req) + 1, dtype=torch.int32)
    pos = 0
    for i, count in enumerate(blocks_per_req):
        table[i, :count] = torch.tensor(perm[pos:pos + count], dtype=torch.int32)
        pos += count
    return table


def _random_qkv(
    seq_len: int, case: AttentionCase, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape_q = (seq_len, case.num_heads, case.head_size)
    shape_kv = (seq_len, case.num_kv_heads, case.head_size)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64)
               for s in (shape_q, shape_kv, shape_kv))
    return q, k, v


def _run_step(
    backend, step, qkv, tables, kv_cache, block_size, dtype, device, scale
) -> torch.Tensor:
    """One forward over `step` = [(request, num_computed, num_new)], tokens laid end to end."""
    q = torch.cat([qkv[r][0][c:c + n] for r, c, n in step]).to(device, dtype)
    k = torch.cat([qkv[r][1][c:c + n] for r, c, n in step]).to(device, dtype)
    v = torch.cat([qkv[r][2][c:c + n] for r, c, n in step]).to(device, dtype)
    common = _common_metadata(step, tables, block_size, device)
    metadata = backend.build_metadata(common)
    return backend.forward(q, k, v, kv_cache, metadata, scale)


def _common_metadata(
    step: list[tuple[int, int, int]], tables: torch.Tensor, block_size: int, device: torch.device
) -> CommonAttentionMetadata:
    reqs = [r for r, _, _ in step]
    new = torch.tensor([n for _, _, n in step], dtype=torch.int32)
    computed = torch.tensor([c for _, c, _ in step], dtype=torch.int32)
    seq_lens = computed + new
    query_start_loc = torch.zeros(len(step) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(new, 0)
    block_table = tables[reqs]
    slots = []
    for i, (_, c, n) in enumerate(step):
        positions = torch.arange(c, c + n)
        slots.append(block_table[i, positions // block_size].long() * block_size
                     + positions % block_size)
    return CommonAttentionMetadata(
        num_reqs=len(step),
        num_actual_tokens=int(new.sum()),
        max_query_len=int(new.max()),
        max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        num_computed_tokens_cpu=computed,
        query_start_loc=query_start_loc.to(device),
        seq_lens=seq_lens.to(device),
        block_table=block_table.to(device),
        slot_mapping=torch.cat(slots).to(device),
    )


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_computed: int, scale: float,
    sliding_window: Optional[int] = None, logits_soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Causal softmax attention in float64; query row j sits at position num_computed + j
    and, with a window W, sees keys at positions > its own - W only; a soft-cap c turns the
    scores s into c * tanh(s / c).

    q: [Q, H, D]; k, v: [S, Hkv, D] with S = num_computed + Q. Query head h reads KV head
    h // (H / Hkv), the usual grouped-query layout.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    if logits_soft_cap is not None:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    q_pos = torch.arange(num_computed, num_computed + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    blocked = k_pos > q_pos
    if sliding_window is not None:
        blocked |= q_pos - k_pos >= sliding_window
    scores = scores.masked_fill(blocked, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)
