"""Paged attention in static-shape form, for platforms that compile fixed shapes.

A building block offered with the contract (used by the Spyre, TPU, Ascend and Gaudi plugins;
any plugin may use it or not): an `AttentionBackend` whose `forward` has every tensor's shape
fixed by a `StepShape`, and metadata that a graph runner re-lays out at a larger, compiled
shape (`StaticAttentionMetadata.padded`) so that padding never reaches the core.

Rule: no data-dependent shapes or Python branches inside `forward`, so a static-graph
compiler (torch.compile with a vendor backend, XLA, HPU/ACL graphs) traces one graph per
step shape. Tokens are laid on a `[batch, query]` grid (request i's j-th new token in cell
i * query + j); each request reads a fixed number of blocks of the cache; a float mask hides
what it must not see. Padding tokens write into a scratch slot (slot 0 of the cache, which no
request reads), padding cells attend to one key so no row is NaN.

Cache layout: `[2, 1 + num_blocks * block_size, num_kv_heads, head_size]`: the scratch slot,
then block b in slots 1 + b * block_size ... The math is plain softmax attention in float32
(the same formula as the CPU reference platform and the conformance kit's reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from platforms.interface import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from platforms.util import cdiv

SCRATCH_SLOT = 0


@dataclass(frozen=True, order=True)
class StepShape:
    """One compiled forward: `batch` requests x `query` new tokens each (laid out as a grid,
    `batch * query` token rows), reading `blocks` KV-cache blocks per request."""

    batch: int
    query: int  # longest chunk of new tokens (prompt length for a prefill, 1 for a decode)
    blocks: int

    @property
    def num_tokens(self) -> int:
        return self.batch * self.query


@dataclass(frozen=True)
class StaticAttentionMetadata:
    """One step laid out for a `StepShape`; `forward` reads only the tensors and the shape."""

    shape: StepShape
    slot_mapping: torch.Tensor  # [T] int64: cache slot each token row writes (0: scratch)
    grid_src: torch.Tensor  # [batch * query] int64: token row feeding each grid cell
    token_cell: torch.Tensor  # [T] int64: grid cell of each token row
    block_table: torch.Tensor  # [batch, blocks] int64
    mask: torch.Tensor  # [batch, query, blocks * block_size] float: 0 or -inf
    # Host-side description, for re-laying the step out in a larger shape (graph runner).
    common: CommonAttentionMetadata
    block_size: int

    def padded(self, shape: StepShape) -> StaticAttentionMetadata:
        """The same step laid out for the larger `shape`, with `shape.num_tokens` rows."""
        return build_static_metadata(self.common, shape, shape.num_tokens, self.block_size,
                                     self.mask.dtype)


def natural_shape(common: CommonAttentionMetadata, block_size: int) -> StepShape:
    """The smallest grid holding this step as it is (no padding requests)."""
    return StepShape(batch=common.num_reqs, query=common.max_query_len,
                     blocks=cdiv(common.max_seq_len, block_size))


def build_static_metadata(
    common: CommonAttentionMetadata, shape: StepShape, num_tokens: int, block_size: int,
    dtype: torch.dtype,
) -> StaticAttentionMetadata:
    """Lay `common` (its `num_actual_tokens` real tokens first) out on `shape`'s grid, for a
    forward over `num_tokens` token rows (the rows past the real ones are padding)."""
    n, real = common.num_reqs, common.num_actual_tokens
    batch, query, blocks = shape.batch, shape.query, shape.blocks
    if n > batch or common.max_query_len > query or real > num_tokens or \
            cdiv(common.max_seq_len, block_size) > blocks:
        raise ValueError(f"A step of {n} requests, {real} tokens, longest query "
                         f"{common.max_query_len}, context {common.max_seq_len} does not fit "
                         f"{shape} with {num_tokens} rows.")
    device = common.block_table.device
    qsl = common.query_start_loc_cpu.long()
    q_lens = qsl[1:] - qsl[:-1]
    req_of_tok = torch.repeat_interleave(torch.arange(n), q_lens)
    cell = req_of_tok * query + (torch.arange(real) - qsl[req_of_tok])

    token_cell = torch.zeros(num_tokens, dtype=torch.long)
    token_cell[:real] = cell
    # Padding cells read a padding row if there is one (else row 0); they are masked anyway.
    grid_src = torch.full((batch * query,), real if num_tokens > real else 0, dtype=torch.long)
    grid_src[cell] = torch.arange(real)

    num_keys = blocks * block_size
    q_pos = common.num_computed_tokens_cpu.long()[:, None] + torch.arange(query)[None, :]
    real_cell = torch.arange(query)[None, :] < q_lens[:, None]  # [n, query]
    allowed = torch.zeros(batch, query, num_keys, dtype=torch.bool)
    allowed[:n] = (torch.arange(num_keys)[None, None, :] <= q_pos[:, :, None]) & real_cell[..., None]
    allowed[:n, :, 0] |= ~real_cell
    allowed[n:, :, 0] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))

    table = torch.zeros(batch, blocks, dtype=torch.long, device=device)
    width = min(blocks, common.block_table.shape[1])
    table[:n, :width] = common.block_table[:n, :width].long()
    slots = torch.full((num_tokens,), SCRATCH_SLOT, dtype=torch.long, device=device)
    slots[:real] = common.slot_mapping[:real].long() + 1
    return StaticAttentionMetadata(
        shape=shape, slot_mapping=slots, grid_src=grid_src.to(device),
        token_cell=token_cell.to(device), block_table=table, mask=mask.to(device),
        common=common, block_size=block_size,
    )


def static_paged_attention(
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, 1 + N * block_size, Hkv, D]
    md: StaticAttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    batch, q_len = md.shape.batch, md.shape.query
    _, _, num_kv_heads, head_size = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    key_cache.index_copy_(0, md.slot_mapping, key)
    value_cache.index_copy_(0, md.slot_mapping, value)

    block_size = md.block_size
    num_keys = md.block_table.shape[1] * block_size
    k_blocks = key_cache[1:].view(-1, block_size, num_kv_heads, head_size)
    v_blocks = value_cache[1:].view(-1, block_size, num_kv_heads, head_size)
    # [batch, Hkv, 1, D, S] and [batch, Hkv, 1, S, D]: one read per KV head, shared by its group.
    k = k_blocks[md.block_table].view(batch, num_keys, num_kv_heads, head_size)
    v = v_blocks[md.block_table].view(batch, num_keys, num_kv_heads, head_size)
    k = k.permute(0, 2, 3, 1).unsqueeze(2).float()
    v = v.permute(0, 2, 1, 3).unsqueeze(2).float()
    # [batch, Hkv, group, query, D]: the query heads sharing a KV head sit together.
    q = query[md.grid_src].view(batch, q_len, num_kv_heads, group, head_size)
    q = q.permute(0, 2, 3, 1, 4).float()
    scores = torch.matmul(q, k) * scale + md.mask[:, None, None].float()
    out = torch.matmul(scores.softmax(dim=-1), v)  # [batch, Hkv, group, query, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch * q_len, num_heads, head_size)
    return out[md.token_cell].to(query.dtype)


class StaticPagedAttentionBackend(AttentionBackend):
    """Paged attention with static shapes; metadata is laid out at the step's own size, and
    the graph runner re-lays it out at a compiled size (`StaticAttentionMetadata.padded`)."""

    name = "static_paged"

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, 1 + num_blocks * s.block_size, s.num_kv_heads, s.head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> StaticAttentionMetadata:
        shape = natural_shape(common, self.spec.block_size)
        return build_static_metadata(common, shape, common.num_actual_tokens,
                                     self.spec.block_size, self.spec.dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: StaticAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return static_paged_attention(query, key, value, kv_cache, metadata, scale)
