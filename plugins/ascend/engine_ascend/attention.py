"""Paged attention for Ascend: torch_npu's fused inference attention over a block cache.

Rule: everything but the two vendor calls is plain torch and runs anywhere: the cache layout,
the metadata in the layout the ops take (int32 block tables and slots, host lists of query
ends and KV lengths), writing new keys/values into their slots, and padding a decode step for
a captured graph. The vendor calls sit behind `NpuAttentionOps` (torch_npu, imported when
first called), so the same backend runs on the CPU with a stand-in for the ops.

Cache layout: `[2, 1 + num_blocks, block_size, num_kv_heads, head_size]`: block 0 is scratch
(padding tokens write there, padding requests read only it), request block b is block b + 1.
The ops see each half as `[1 + num_blocks, block_size, num_kv_heads * head_size]` (BSH).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Protocol

import torch

from platforms.interface import AttentionBackend, AttentionSpec, CommonAttentionMetadata

SCRATCH_BLOCK = 0
CAUSAL_MASK_SIZE = 2048  # sparse_mode 3 takes a fixed 2048 x 2048 causal mask


@dataclass(frozen=True)
class AscendAttentionMetadata:
    """One step as torch_npu's attention ops take it."""

    num_actual_tokens: int
    num_reqs: int
    decode_only: bool  # every request has one new token: the paged decode op
    slot_mapping: torch.Tensor  # [T] int32: flat cache slot (scratch block shifted in)
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32 (scratch block shifted in)
    seq_lens: torch.Tensor  # [num_reqs] int32, device: KV length of each request
    query_ends: tuple[int, ...]  # host: cumulative end of each request's tokens (TND layout)
    kv_lens: tuple[int, ...]  # host: KV length of each request
    block_size: int

    def padded_decode(self, num_reqs: int) -> AscendAttentionMetadata:
        """This decode step with padding requests up to `num_reqs` (a captured batch size):
        each padding request has one token, writes the scratch slot and reads one scratch key."""
        if not self.decode_only:
            raise ValueError("only decode-only steps are padded for graphs; this step has "
                             "prefill chunks.")
        extra = num_reqs - self.num_reqs
        if extra < 0:
            raise ValueError(f"cannot pad {self.num_reqs} requests down to {num_reqs}.")
        if extra == 0:
            return self
        device = self.block_table.device
        pad_table = torch.full((extra, self.block_table.shape[1]), SCRATCH_BLOCK,
                               dtype=torch.int32, device=device)
        return replace(
            self,
            num_actual_tokens=self.num_actual_tokens + extra,
            num_reqs=num_reqs,
            slot_mapping=torch.cat([self.slot_mapping, torch.full(
                (extra,), SCRATCH_BLOCK * self.block_size, dtype=torch.int32, device=device)]),
            block_table=torch.cat([self.block_table, pad_table]),
            seq_lens=torch.cat([self.seq_lens, torch.ones(extra, dtype=torch.int32,
                                                          device=device)]),
            query_ends=self.query_ends + tuple(
                self.num_actual_tokens + i + 1 for i in range(extra)),
            kv_lens=self.kv_lens + (1,) * extra,
        )


def build_ascend_metadata(common: CommonAttentionMetadata, block_size: int
                          ) -> AscendAttentionMetadata:
    """The ops' layout of `common`: block ids and slots shifted past the scratch block,
    int32; query ends and KV lengths as host tuples (the fused op takes int lists)."""
    n, t = common.num_reqs, common.num_actual_tokens
    qsl = common.query_start_loc_cpu[: n + 1].tolist()
    return AscendAttentionMetadata(
        num_actual_tokens=t,
        num_reqs=n,
        decode_only=common.max_query_len == 1,
        slot_mapping=(common.slot_mapping[:t] + block_size).to(torch.int32),
        block_table=(common.block_table[:n] + 1).to(torch.int32),
        seq_lens=common.seq_lens[:n].to(torch.int32),
        query_ends=tuple(int(e) for e in qsl[1:]),
        kv_lens=tuple(int(s) for s in common.seq_lens_cpu[:n].tolist()),
        block_size=block_size,
    )


class NpuAttentionOps(Protocol):
    """The two vendor calls. `query` is `[T, H, D]`; caches are `[blocks, block_size, Hkv*D]`;
    both return `[T, H, D]`."""

    def prefill(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                md: AscendAttentionMetadata, num_kv_heads: int, scale: float) -> torch.Tensor: ...

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               md: AscendAttentionMetadata, num_kv_heads: int, scale: float) -> torch.Tensor: ...


class TorchNpuOps:
    """torch_npu's fused inference attention (TND queries over the paged BSH cache, causal
    mask in sparse mode 3) and its paged decode attention."""

    def __init__(self) -> None:
        self._mask: Optional[torch.Tensor] = None

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if self._mask is None or self._mask.device != device:
            ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool)
            self._mask = torch.triu(ones, diagonal=1).to(device)  # True: masked out
        return self._mask

    def prefill(self, query, key_cache, value_cache, md, num_kv_heads, scale):
        import torch_npu

        out, _ = torch_npu.npu_fused_infer_attention_score(
            query, key_cache, value_cache,
            atten_mask=self._causal_mask(query.device), block_table=md.block_table,
            input_layout="TND", block_size=md.block_size,
            actual_seq_lengths=list(md.query_ends), actual_seq_lengths_kv=list(md.kv_lens),
            num_heads=query.shape[1], num_key_value_heads=num_kv_heads, scale=scale,
            sparse_mode=3)
        return out

    def decode(self, query, key_cache, value_cache, md, num_kv_heads, scale):
        import torch_npu

        out = torch.empty_like(query)
        head_size = query.shape[-1]
        torch_npu._npu_paged_attention(
            query=query, key_cache=key_cache.view(*key_cache.shape[:2], num_kv_heads, head_size),
            value_cache=value_cache.view(*value_cache.shape[:2], num_kv_heads, head_size),
            num_kv_heads=num_kv_heads, num_heads=query.shape[1], scale_value=scale,
            block_table=md.block_table, context_lens=md.seq_lens, out=out)
        return out


class AscendAttentionBackend(AttentionBackend):
    name = "ascend-fused-paged"

    def __init__(self, spec: AttentionSpec, ops: Optional[NpuAttentionOps] = None) -> None:
        super().__init__(spec)
        self.ops: NpuAttentionOps = ops if ops is not None else TorchNpuOps()

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, 1 + num_blocks, s.block_size, s.num_kv_heads, s.head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> AscendAttentionMetadata:
        return build_ascend_metadata(common, self.spec.block_size)

    def forward(self, query, key, value, kv_cache, metadata: AscendAttentionMetadata, scale):
        t = metadata.num_actual_tokens
        num_kv_heads = self.spec.num_kv_heads
        slots = metadata.slot_mapping.long()
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.view(-1, num_kv_heads, self.spec.head_size).index_copy_(0, slots, key[:t])
        value_cache.view(-1, num_kv_heads, self.spec.head_size).index_copy_(0, slots, value[:t])
        bsh = (key_cache.shape[0], key_cache.shape[1], -1)
        run = self.ops.decode if metadata.decode_only else self.ops.prefill
        out = run(query[:t].contiguous(), key_cache.view(bsh), value_cache.view(bsh),
                  metadata, num_kv_heads, scale)
        if out.shape[0] == query.shape[0]:
            return out
        return torch.cat([out, query.new_zeros((query.shape[0] - t, *query.shape[1:]))])
