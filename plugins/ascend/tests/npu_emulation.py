"""A CPU stand-in for the two torch_npu attention calls, written from their documented meaning
(not from their code): TND queries with cumulative ends, a paged BSH cache read through an
int32 block table, per-request KV lengths, a causal mask aligned to the end of each request's
keys (sparse mode 3); the paged decode op reads KV lengths from a device tensor. It checks
this plugin's own cache writes, metadata and layout; it cannot check the real ops."""

from __future__ import annotations

import torch


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
            ) -> torch.Tensor:
    """q [Tq, H, D], keys/values [S, Hkv, D]; query j sees keys up to S - Tq + j."""
    tq, h, _ = q.shape
    group = h // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.float(), k) * scale
    s = keys.shape[0]
    visible = torch.arange(s)[None, :] <= (s - tq + torch.arange(tq))[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(q.dtype)


def _keys(cache: torch.Tensor, table_row: torch.Tensor, length: int, num_kv_heads: int
          ) -> torch.Tensor:
    blocks = cache[table_row.long()]  # [blocks, block_size, Hkv*D]
    return blocks.reshape(-1, num_kv_heads, cache.shape[-1] // num_kv_heads)[:length]


class EmulatedNpuOps:
    def prefill(self, query, key_cache, value_cache, md, num_kv_heads, scale):
        out, start = torch.empty_like(query), 0
        for i, end in enumerate(md.query_ends):
            kv = md.kv_lens[i]
            out[start:end] = _attend(query[start:end],
                                     _keys(key_cache, md.block_table[i], kv, num_kv_heads),
                                     _keys(value_cache, md.block_table[i], kv, num_kv_heads),
                                     scale)
            start = end
        return out

    def decode(self, query, key_cache, value_cache, md, num_kv_heads, scale):
        out = torch.empty_like(query)
        for i, kv in enumerate(md.seq_lens.tolist()):
            out[i : i + 1] = _attend(query[i : i + 1],
                                     _keys(key_cache, md.block_table[i], kv, num_kv_heads),
                                     _keys(value_cache, md.block_table[i], kv, num_kv_heads),
                                     scale)
        return out
