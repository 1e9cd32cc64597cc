"""Scatter new keys and values into the paged KV cache.

Rule: token t goes to slot `slot_mapping[t]` = block * block_size + offset; a negative slot
is padding (CUDA-graph batches) and is skipped, never written.

Cache layout: [2, num_blocks, block_size, num_kv_heads, head_size] (keys, then values), the
same as the CPU platform. A token's heads are contiguous, so one slot write is one
contiguous run of num_kv_heads * head_size elements, and the attention kernel reads each
(token, kv head) row as head_size contiguous elements (vectorised 16-byte loads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head,
    num_kv_heads, head_size, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_size)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = cache_ptr + block * stride_c_block + offset * stride_c_slot + heads * stride_c_head + dims
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [>= 0] int64; the first numel() tokens are written
) -> None:
    """Write `key[t]`, `value[t]` to slot `slot_mapping[t]` for t < slot_mapping.numel()."""
    num_tokens = slot_mapping.numel()
    if num_tokens == 0:
        return
    _, _, block_size, num_kv_heads, head_size = kv_cache.shape
    if key.shape[0] < num_tokens or key.shape[1:] != (num_kv_heads, head_size):
        raise ValueError(
            f"write_kv: key {tuple(key.shape)} does not fit slot_mapping ({num_tokens} tokens) "
            f"and the cache's [.., {num_kv_heads}, {head_size}] heads"
        )
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("write_kv: key, value and kv_cache need a contiguous last dimension")
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_kv_heads, head_size, block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_size),
    )
