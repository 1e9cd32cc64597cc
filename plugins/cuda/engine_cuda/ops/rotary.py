"""Rotary position embedding (neox layout), in place, in Triton.

Rule: the same numbers as the torch reference (`platforms.kernels.rotary_embedding`): each
head's first half x1 and second half x2 become x1*cos - x2*sin and x2*cos + x1*sin in
float32, cast back to the input dtype. cos/sin come from the float32 cache row of the token's
position (cos in its first half, sin in its second). One program per token rotates all of
its q and k heads, so the cache row is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    p1 = x_ptr + heads * stride_h + cols
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_c + cols)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + cols)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_HK)


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    cos_sin_cache: torch.Tensor,  # [max_position, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place by their tokens' positions; returns (q, k)."""
    head_size = q.shape[-1]
    if (k.shape[-1] != head_size or cos_sin_cache.shape[-1] != head_size
            or head_size & (head_size - 1) or head_size < 2):
        raise ValueError(
            f"rotary_embedding: q/k head size {head_size}/{k.shape[-1]} and cache width "
            f"{cos_sin_cache.shape[-1]} must be equal powers of two (the whole head rotates)"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding: q, k and the cache need a contiguous last dimension")
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"rotary_embedding: the cos/sin cache is {cos_sin_cache.dtype}, "
                         "expected float32")
    num_tokens = positions.numel()
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), q.shape[1], k.shape[1],
            HALF=head_size // 2, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), num_warps=4,
        )
    return q, k
