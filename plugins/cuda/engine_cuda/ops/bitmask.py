"""Structured outputs' token bitmask on the logits, in Triton.

Rule: the numbers of the torch reference (`platforms.kernels.apply_token_bitmask`): a token
whose bit is clear, or that lies past the mask's last word, gets -inf; the others are not
touched. One program per (masked row, block of tokens) reads the row's words and writes only
the forbidden logits, so the logits are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_l, stride_b, vocab,
                                words, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + k).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    word = tokens // 32
    bits = tl.load(bitmask_ptr + k * stride_b + word, mask=in_vocab & (word < words), other=0)
    allowed = ((bits >> (tokens % 32)) & 1) != 0
    forbidden = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_l + tokens, forbidden, mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
                        ) -> None:
    """In place: row rows[k] of logits [R, V] keeps the tokens set in bitmask[k] [W] int32."""
    if bitmask.dtype != torch.int32 or logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"apply_token_bitmask: logits [R, V] and an int32 bitmask [K, W] "
                         f"expected, got {tuple(logits.shape)} and {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("apply_token_bitmask: the last dimensions must be contiguous")
    if rows.numel() != bitmask.shape[0]:
        raise ValueError(f"apply_token_bitmask: {rows.numel()} rows for {bitmask.shape[0]} "
                         "bitmask rows")
    vocab = logits.shape[1]
    if rows.numel() and vocab:
        grid = (rows.numel(), triton.cdiv(vocab, BLOCK))
        _apply_token_bitmask_kernel[grid](logits, bitmask, rows, logits.stride(0),
                                          bitmask.stride(0), vocab, bitmask.shape[1],
                                          BLOCK=BLOCK, num_warps=4)
