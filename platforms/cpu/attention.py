"""Paged attention for the CPU reference platform, with plain torch ops.

Rule: correctness first, then speed from batching what batches cheaply. All decode tokens
of a step (one query each) attend in one padded SDPA call over their gathered blocks;
prefill chunks attend one request at a time, causally offset by their cached context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from platforms.interface import AttentionBackend, CommonAttentionMetadata


@dataclass(frozen=True)
class CpuAttentionMetadata:
    common: CommonAttentionMetadata
    # Decode group: requests with exactly one new token.
    decode_req_idx: Optional[torch.Tensor]  # [D] int64
    decode_token_idx: Optional[torch.Tensor]  # [D] int64: row of each decode token
    decode_mask: Optional[torch.Tensor]  # [D, 1, 1, max_decode_seq] bool, True = attend
    decode_max_seq: int
    # Prefill group: (request index, token start, token end, num computed tokens, seq len).
    prefills: list[tuple[int, int, int, int, int]]


class CpuAttentionBackend(AttentionBackend):
    """KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_size]."""

    name = "cpu_sdpa"

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        qsl = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens_cpu.tolist()
        computed = common.num_computed_tokens_cpu.tolist()
        decode_reqs, prefills = [], []
        for i in range(common.num_reqs):
            start, end = qsl[i], qsl[i + 1]
            if end - start == 1:
                decode_reqs.append(i)
            elif end > start:
                prefills.append((i, start, end, computed[i], seq_lens[i]))
        if not decode_reqs:
            return CpuAttentionMetadata(common, None, None, None, 0, prefills)
        req_idx = torch.tensor(decode_reqs, dtype=torch.long)
        token_idx = common.query_start_loc_cpu[req_idx].long()
        lens = common.seq_lens_cpu[req_idx].long()
        max_seq = int(lens.max())
        mask = torch.arange(max_seq)[None, :] < lens[:, None]
        return CpuAttentionMetadata(
            common, req_idx, token_idx, mask[:, None, None, :], max_seq, prefills
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: CpuAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        common = metadata.common
        num_tokens = common.num_actual_tokens
        block_size = self.spec.block_size
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        # [num_blocks * block_size, num_kv_heads, head_size] views for slot writes and gathers.
        flat_k = key_cache.view(-1, *key_cache.shape[2:])
        flat_v = value_cache.view(-1, *value_cache.shape[2:])
        slots = common.slot_mapping[:num_tokens]
        flat_k.index_copy_(0, slots, key[:num_tokens])
        flat_v.index_copy_(0, slots, value[:num_tokens])

        out = torch.empty_like(query)
        num_heads, num_kv_heads = self.spec.num_heads, self.spec.num_kv_heads
        gqa = num_heads != num_kv_heads
        if metadata.decode_req_idx is not None:
            max_seq = metadata.decode_max_seq
            num_blocks = -(-max_seq // block_size)
            tables = common.block_table[metadata.decode_req_idx, :num_blocks].long()
            # [D, num_blocks * block_size, num_kv_heads, head_size] -> [D, Hkv, S, head]
            k = key_cache[tables].flatten(1, 2)[:, :max_seq].transpose(1, 2)
            v = value_cache[tables].flatten(1, 2)[:, :max_seq].transpose(1, 2)
            q = query[metadata.decode_token_idx].unsqueeze(2)  # [D, H, 1, head]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=metadata.decode_mask, scale=scale, enable_gqa=gqa
            )
            out[metadata.decode_token_idx] = o.squeeze(2)
        for req, start, end, num_computed, seq_len in metadata.prefills:
            num_blocks = -(-seq_len // block_size)
            table = common.block_table[req, :num_blocks].long()
            k = key_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, S, head]
            v = value_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)
            q = query[start:end].transpose(0, 1)  # [H, Q, head]
            if num_computed == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                   enable_gqa=gqa)
            else:
                # Query row j sits at position num_computed + j and sees keys 0..that position.
                q_pos = torch.arange(num_computed, seq_len)[:, None]
                mask = torch.arange(seq_len)[None, :] <= q_pos
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                   enable_gqa=gqa)
            out[start:end] = o.transpose(0, 1)
        return out
