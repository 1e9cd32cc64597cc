"""Conformance check for a platform's attention backend against a float64 reference.

Rule: the check uses only the contract (`kv_cache_shape`, `build_metadata`, `forward`), never
a backend's cache layout. Cached context is written by the backend itself in a first step,
then a second step mixes prefill chunks (with and without context) and decodes over
non-contiguous blocks; both steps are compared with plain softmax attention over unpaged
K/V computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from platforms.interface import AttentionSpec, CommonAttentionMetadata, Platform


@dataclass(frozen=True)
class AttentionCase:
    num_heads: int
    num_kv_heads: int
    head_size: int

    @property
    def id(self) -> str:
        return f"h{self.num_heads}-kv{self.num_kv_heads}-d{self.head_size}"


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
) -> float:
    """Run two steps through `platform`'s backend and raise AssertionError on a mismatch.

    Returns the largest absolute error seen, so callers can report it.
    """
    gen = torch.Generator().manual_seed(seed)
    spec = AttentionSpec(case.num_heads, case.num_kv_heads, case.head_size, dtype, block_size)
    backend = platform.attention_backend(spec)
    device = platform.device()
    seq_lens = [computed + new for computed, new in requests]
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

    context_step = [(i, 0, c) for i, (c, _) in enumerate(requests) if c > 0]
    new_step = [(i, c, n) for i, (c, n) in enumerate(requests)]
    worst = 0.0
    for name, step in (("context step", context_step), ("mixed step", new_step)):
        if not step:
            continue
        out = _run_step(backend, step, qkv, tables, kv_cache, block_size, dtype, device, scale)
        row = 0
        for req, start, count in step:
            q, k, v = qkv[req]
            expected = _reference(q[start:start + count], k[:start + count],
                                  v[:start + count], start, scale)
            got = out[row:row + count].to("cpu", torch.float64)
            err = float((got - expected).abs().max())
            worst = max(worst, err)
            if not err <= tol:  # also catches NaN
                raise AssertionError(
                    f"{name}, case {case.id}, request {req} (context {start}, new {count}): "
                    f"max abs error {err:.3g} > {tol:.3g} vs the float64 reference"
                )
            row += count
    return worst


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_computed: int, scale: float
) -> torch.Tensor:
    """Causal softmax attention in float64; query row j sits at position num_computed + j.

    q: [Q, H, D]; k, v: [S, Hkv, D] with S = num_computed + Q. Query head h reads KV head
    h // (H / Hkv), the usual grouped-query layout.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(num_computed, num_computed + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)
