"""Paged attention for the CPU reference platform, with plain torch ops.

Rule: correctness first, then speed from batching what batches cheaply. Decode tokens (one
query each) attend in a few padded SDPA calls over their gathered blocks, grouped by context
length so short contexts are not padded to the longest; prefill chunks attend one request at
a time, causally offset by their cached context. Masks are additive float tensors: SDPA's
CPU fast path takes them, while boolean masks measured about 1.5x slower.

With a sliding window W, every read starts at the block holding the first key the window
reaches (for a prefill chunk: its first query's, for a decode: its own), because the table
entries of earlier blocks may be stale: they are never gathered, not even to be masked. A
logits soft-cap, which SDPA has no argument for, takes a plain matmul-softmax path; the
native decode kernel does both itself.
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
    # Torch path with a window: [D, max_keys] int64 cache slots of each decode's window
    # (padding repeats its last key, masked), so nothing before the window is gathered.
    slots: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class PrefillChunk:
    req: int
    start: int  # first token row
    end: int
    num_computed: int  # cached context before this chunk
    seq_len: int
    first_block: int  # cached context is gathered from this block of the request's table
    # [Q, seq_len - first_block * block_size] float; None: plain causal over the new keys.
    mask: torch.Tensor | None


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
                prefills.append(self._prefill_chunk(i, start, end, computed[i], seq_lens[i]))
        decode_groups = [self._decode_group(common, reqs) for _, reqs in sorted(groups.items())]
        num_decodes = sum(len(g.req_idx) for g in decode_groups)
        return CpuAttentionMetadata(
            common, decode_groups, prefills,
            is_pure_decode=len(decode_groups) == 1 and num_decodes == common.num_actual_tokens,
        )

    def _first_key(self, first_query_pos: int) -> int:
        """The first key a query at this position attends (0 without a window)."""
        window = self.spec.sliding_window
        return 0 if window is None else max(0, first_query_pos - window + 1)

    def _prefill_chunk(self, req: int, start: int, end: int, computed: int, seq_len: int
                       ) -> PrefillChunk:
        spec = self.spec
        plain = spec.sliding_window is None and spec.logits_soft_cap is None
        if computed == 0 and plain:
            return PrefillChunk(req, start, end, computed, seq_len, 0, None)
        # Keys from the first block the chunk's first query reaches (all new keys when there
        # is no context); query row j sits at position computed + j.
        first_block = self._first_key(computed) // spec.block_size if computed > 0 else 0
        q_pos = torch.arange(computed, seq_len)[:, None]
        k_pos = torch.arange(first_block * spec.block_size, seq_len)[None, :]
        blocked = k_pos > q_pos
        if spec.sliding_window is not None:
            blocked |= q_pos - k_pos >= spec.sliding_window
        return PrefillChunk(req, start, end, computed, seq_len, first_block,
                            self._float_mask(blocked))

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
        if self.spec.sliding_window is not None:
            return self._window_decode_group(common, req_idx, token_idx, lens)
        blocked = torch.arange(max_seq)[None, :] >= lens.long()[:, None]
        return DecodeGroup(req_idx, token_idx, max_seq,
                           mask=self._float_mask(blocked)[:, None, None, :])

    def _window_decode_group(self, common: CommonAttentionMetadata, req_idx: torch.Tensor,
                             token_idx: torch.Tensor, lens: torch.Tensor) -> DecodeGroup:
        """Decodes gathered slot by slot over their windows only (positions seq_len - W ..
        seq_len - 1), padded to the longest window with copies of each one's last key."""
        lens = lens.long()
        first = (lens - self.spec.sliding_window).clamp(min=0)  # [D]
        num_keys = int((lens - first).max())
        pos = first[:, None] + torch.arange(num_keys)[None, :]  # [D, K]
        padding = pos >= lens[:, None]
        pos = torch.minimum(pos, (lens - 1).clamp(min=0)[:, None])
        bs = self.spec.block_size
        tables = common.block_table[req_idx].long()
        slots = tables.gather(1, pos // bs) * bs + pos % bs
        return DecodeGroup(req_idx, token_idx, num_keys, slots=slots,
                           mask=self._float_mask(padding)[:, None, None, :])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor], scale: float, is_causal: bool = False
                ) -> torch.Tensor:
        """SDPA over [..., Q, head] x [..., S, head]; with a soft-cap, the same attention
        spelled out (scores in float32), since SDPA cannot cap its scores."""
        cap = self.spec.logits_soft_cap
        if cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                  scale=scale)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        scores = torch.tanh(scores / cap) * cap
        if mask is not None:
            scores = scores + mask
        return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)

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
                spec.sliding_window or 0, spec.logits_soft_cap or 0.0,
                torch.get_num_threads(),
            )
            return out
        num_decodes = len(group.req_idx)
        if group.slots is not None:
            # Window: only its slots, [D * K, Hkv, head] -> [D, K, Hkv, head]
            flat = group.slots.flatten()
            shape = (num_decodes, group.max_seq, spec.num_kv_heads, -1)
            k = key_cache.flatten(0, 1).index_select(0, flat).view(shape)
            v = value_cache.flatten(0, 1).index_select(0, flat).view(shape)
        else:
            num_blocks = cdiv(group.max_seq, spec.block_size)
            tables = common.block_table[group.req_idx, :num_blocks].flatten().long()
            # Gather whole blocks: [D * num_blocks, block_size, Hkv, head] -> [D, S, Hkv, head]
            shape = (num_decodes, num_blocks * spec.block_size, spec.num_kv_heads, -1)
            k = key_cache.index_select(0, tables).view(shape)[:, :group.max_seq]
            v = value_cache.index_select(0, tables).view(shape)[:, :group.max_seq]
        # GQA without copying K/V: the query heads that share a KV head become that head's
        # query rows, [D, Hkv, heads_per_kv, head]. (enable_gqa measured 5x slower in bf16.)
        q = query[group.token_idx].view(num_decodes, spec.num_kv_heads, -1, spec.head_size)
        out = self._attend(q, k.transpose(1, 2), v.transpose(1, 2), group.mask, scale)
        return out.reshape(num_decodes, spec.num_heads, spec.head_size)

    def _prefill(self, query, key, value, key_cache, value_cache, common, chunk: PrefillChunk,
                 scale) -> torch.Tensor:  # [Q, H, head]
        spec = self.spec
        if chunk.num_computed == 0:
            # No cached context: the new keys are the whole sequence, no gather needed.
            k, v = key[chunk.start:chunk.end], value[chunk.start:chunk.end]
        else:
            # From the first block the window reaches (0 without one): earlier may be stale.
            num_blocks = cdiv(chunk.seq_len, spec.block_size)
            table = common.block_table[chunk.req, chunk.first_block:num_blocks].long()
            num_keys = chunk.seq_len - chunk.first_block * spec.block_size
            k = key_cache[table].flatten(0, 1)[:num_keys]  # [S, Hkv, head]
            v = value_cache[table].flatten(0, 1)[:num_keys]
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
        o = self._attend(q, k, v, chunk.mask, scale, is_causal=chunk.mask is None)
        return o[0].transpose(0, 1)
