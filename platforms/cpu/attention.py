"""Paged attention for the CPU reference platform, with plain torch ops.

Rule: correctness first, then speed from batching what batches cheaply. Decode tokens (one
query each) attend in a few padded SDPA calls over their gathered blocks, grouped by context
length so short contexts are not padded to the longest; prefill chunks attend one request at
a time, causally offset by their cached context. Masks are additive float tensors: SDPA's
CPU fast path takes them, while boolean masks measured about 1.5x slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from platforms.cpu.native import load_library
from platforms.interface import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from platforms.util import cdiv

# Decode contexts up to this many tokens share a group; beyond it, groups double in size.
_MIN_GROUP_LEN = 128


@dataclass(frozen=True)
class DecodeGroup:
    req_idx: torch.Tensor  # [D] int64: requests with exactly one new token
    token_idx: torch.Tensor  # [D] int64: the row of each one's token
    max_seq: int
    # Torch path: [D, 1, 1, max_seq] float, 0 = attend, -inf = padding.
    mask: Optional[torch.Tensor] = None
    # Native path (no padding, no gather): the group's block tables and lengths, int32.
    block_table: Optional[torch.Tensor] = None  # [D, max_blocks]
    seq_lens: Optional[torch.Tensor] = None  # [D]


@dataclass(frozen=True)
class PrefillChunk:
    req: int
    start: int  # first token row
    end: int
    num_computed: int  # cached context before this chunk
    seq_len: int
    mask: torch.Tensor | None  # [Q, seq_len] float when there is cached context


@dataclass(frozen=True)
class CpuAttentionMetadata:
    common: CommonAttentionMetadata
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    is_pure_decode: bool  # every token is a decode, in request order


def _group_of(seq_len: int) -> int:
    """Bucket index: 0 for <= _MIN_GROUP_LEN, then one per doubling."""
    return max(0, (seq_len - 1) // _MIN_GROUP_LEN).bit_length()


class CpuAttentionBackend(AttentionBackend):
    """KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_size]."""

    name = "cpu_sdpa"

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        # The native decode kernel reads float32 blocks in place; other dtypes use torch.
        self.native = load_library() if spec.dtype == torch.float32 else None

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuAttentionMetadata:
        qsl = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens_cpu.tolist()
        computed = common.num_computed_tokens_cpu.tolist()
        groups: dict[int, list[int]] = {}
        prefills = []
        for i in range(common.num_reqs):
            start, end = qsl[i], qsl[i + 1]
            if end - start == 1:
                # The native kernel has no padding to avoid: one group holds every decode.
                key = 0 if self.native is not None else _group_of(seq_lens[i])
                groups.setdefault(key, []).append(i)
            elif end > start:
                mask = None
                if computed[i] > 0:
                    # Query row j sits at position computed + j and sees keys 0..that position.
                    q_pos = torch.arange(computed[i], seq_lens[i])[:, None]
                    blocked = torch.arange(seq_lens[i])[None, :] > q_pos
                    mask = self._float_mask(blocked)
                prefills.append(PrefillChunk(i, start, end, computed[i], seq_lens[i], mask))
        decode_groups = [self._decode_group(common, reqs) for _, reqs in sorted(groups.items())]
        num_decodes = sum(len(g.req_idx) for g in decode_groups)
        return CpuAttentionMetadata(
            common, decode_groups, prefills,
            is_pure_decode=len(decode_groups) == 1 and num_decodes == common.num_actual_tokens,
        )

    def _float_mask(self, blocked: torch.Tensor) -> torch.Tensor:
        return torch.zeros(blocked.shape, dtype=self.spec.dtype).masked_fill_(blocked, -torch.inf)

    def _decode_group(self, common: CommonAttentionMetadata, reqs: list[int]) -> DecodeGroup:
        req_idx = torch.tensor(reqs, dtype=torch.long)
        lens = common.seq_lens_cpu[req_idx]
        max_seq = int(lens.max())
        token_idx = common.query_start_loc_cpu[req_idx].long()
        if self.native is not None:
            num_blocks = cdiv(max_seq, self.spec.block_size)
            table = common.block_table[req_idx, :num_blocks].contiguous()
            return DecodeGroup(req_idx, token_idx, max_seq, block_table=table,
                               seq_lens=lens.contiguous())
        blocked = torch.arange(max_seq)[None, :] >= lens.long()[:, None]
        return DecodeGroup(req_idx, token_idx, max_seq,
                           mask=self._float_mask(blocked)[:, None, None, :])

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
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        # [num_blocks * block_size, num_kv_heads, head_size] views for the slot writes.
        slots = common.slot_mapping[:num_tokens]
        key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots, key[:num_tokens])
        value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots, value[:num_tokens])

        if metadata.is_pure_decode:
            return self._decode(query, key_cache, value_cache, common,
                                metadata.decode_groups[0], scale)
        out = torch.empty_like(query)
        for group in metadata.decode_groups:
            out[group.token_idx] = self._decode(query, key_cache, value_cache, common, group,
                                                scale)
        for chunk in metadata.prefills:
            out[chunk.start:chunk.end] = self._prefill(query, key, value, key_cache,
                                                       value_cache, common, chunk, scale)
        return out

    def _decode(self, query, key_cache, value_cache, common, group: DecodeGroup, scale
                ) -> torch.Tensor:  # [D, H, head]
        spec = self.spec
        if group.block_table is not None:
            pure = len(group.token_idx) == common.num_actual_tokens  # rows already in order
            q = query.contiguous() if pure else query[group.token_idx].contiguous()
            out = torch.empty_like(q)
            table = group.block_table
            self.native.paged_decode_f32(
                q.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), table.data_ptr(),
                table.stride(0), group.seq_lens.data_ptr(), out.data_ptr(), q.shape[0],
                spec.num_heads, spec.num_kv_heads, spec.head_size, spec.block_size, scale,
                torch.get_num_threads(),
            )
            return out
        num_blocks = cdiv(group.max_seq, spec.block_size)
        tables = common.block_table[group.req_idx, :num_blocks].flatten().long()
        num_decodes = len(group.req_idx)
        # Gather whole blocks: [D * num_blocks, block_size, Hkv, head] -> [D, S, Hkv, head]
        shape = (num_decodes, num_blocks * spec.block_size, spec.num_kv_heads, -1)
        k = key_cache.index_select(0, tables).view(shape)[:, :group.max_seq]
        v = value_cache.index_select(0, tables).view(shape)[:, :group.max_seq]
        # GQA without copying K/V: the query heads that share a KV head become that head's
        # query rows, [D, Hkv, heads_per_kv, head]. (enable_gqa measured 5x slower in bf16.)
        q = query[group.token_idx].view(num_decodes, spec.num_kv_heads, -1, spec.head_size)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.mask, scale=scale
        )
        return out.reshape(num_decodes, spec.num_heads, spec.head_size)

    def _prefill(self, query, key, value, key_cache, value_cache, common, chunk: PrefillChunk,
                 scale) -> torch.Tensor:  # [Q, H, head]
        spec = self.spec
        if chunk.mask is None:
            # No cached context: the new keys are the whole sequence, no gather needed.
            k, v = key[chunk.start:chunk.end], value[chunk.start:chunk.end]
        else:
            num_blocks = cdiv(chunk.seq_len, spec.block_size)
            table = common.block_table[chunk.req, :num_blocks].long()
            k = key_cache[table].flatten(0, 1)[:chunk.seq_len]  # [S, Hkv, head]
            v = value_cache[table].flatten(0, 1)[:chunk.seq_len]
        seq_len = k.shape[0]
        if spec.num_heads != spec.num_kv_heads:
            # Broadcast each KV head to its query heads. 4-D inputs take SDPA's flash kernel
            # on CPU; 3-D inputs or enable_gqa fell back to a path measured ~3x slower.
            group = spec.num_heads // spec.num_kv_heads
            k = k[:, :, None].expand(seq_len, spec.num_kv_heads, group, spec.head_size)
            v = v[:, :, None].expand(seq_len, spec.num_kv_heads, group, spec.head_size)
            k, v = k.reshape(seq_len, spec.num_heads, -1), v.reshape(seq_len, spec.num_heads, -1)
        q = query[chunk.start:chunk.end].transpose(0, 1)[None]  # [1, H, Q, head]
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, S, head]
        if chunk.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, scale=scale)
        return o[0].transpose(0, 1)
