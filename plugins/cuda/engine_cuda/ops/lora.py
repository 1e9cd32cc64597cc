"""Batched multi-LoRA in Triton (punica's shrink and expand, SGMV-style): one launch per op
for a whole mixed batch, whatever adapters its tokens use.

Rule: the numbers of the torch references (`platforms.kernels.lora_shrink`, `lora_expand`),
and nothing on the host: the grid follows from (T, L, R, slice sizes) alone, never from the
slot values, and no tensor is sized by them, so a call needs no synchronisation and a CUDA
graph captured with `slot_ids` as an input replays correctly with the slots of a new step.

Why no sort by slot (as the reference does): the tokens of one request are contiguous in
the batch, so a block of BLOCK_T tokens almost always holds one or two adapters. A program
visits only the slots present in its block, in ascending order (a min-reduction over the
block's slot ids finds the next one), and for each does one `tl.dot` with the rows of that
slot's tokens (other rows zeroed). A block of 16 decode tokens of 16 requests with
different adapters costs up to min(16, S) dots; a prefill block, one. Tokens of slot -1
take no part: their shrink rows are zeros and expand leaves their outputs untouched.

* `_shrink_kernel`, grid (token blocks, L): out[l, tokens] = x[tokens] @ lora_a[l, s]^T,
  bf16/fp16 on the tensor cores into float32 (float32 inputs: IEEE float32, no TF32). R fits
  one tile (BLOCK_R = next power of two, at least 16); the loop runs over H.
* `_expand_kernel`, grid (token blocks, L, column tiles of the largest slice): y[tokens,
  o_l + cols] += (buf[l, tokens] @ lora_b[l, s, cols]^T) in float32 (lora_b widened: the
  reference multiplies in float32, and with K = R this is little work), cast once to y's
  dtype and added. Slice sizes arrive as scalars (up to `MAX_SLICES` per launch, which
  covers q/k/v and gate/up; more are launched in groups), so no device table is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SLICES = 4  # slice sizes passed to one expand launch as scalars


@triton.jit
def _next_slot(slots, after, num_slots):
    """The smallest slot id above `after` among `slots` ([BLOCK_T] int32), else num_slots."""
    return tl.min(tl.where(slots > after, slots, num_slots), axis=0)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slot_ptr, out_ptr, num_tokens, hidden, rank, num_slots,
    stride_xt, stride_xh, stride_al, stride_as, stride_ar, stride_ah,
    stride_ol, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    lora_slice = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    slots = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    r = tl.arange(0, BLOCK_R)
    h = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    a_slice = a_ptr + lora_slice * stride_al + r[None, :] * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    slot = _next_slot(slots, -1, num_slots)
    while slot < num_slots:
        mine = (slots == slot)[:, None]
        a_cols = a_slice + slot.to(tl.int64) * stride_as
        for k in range(0, hidden, BLOCK_H):
            hk = k + h
            h_ok = hk < hidden
            xs = tl.load(x_rows + hk[None, :] * stride_xh, mask=mine & h_ok[None, :], other=0.0)
            a = tl.load(a_cols + hk[:, None] * stride_ah,  # [BLOCK_H, BLOCK_R]: A^T
                        mask=h_ok[:, None] & (r < rank)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xs, a, acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, a, acc)
        slot = _next_slot(slots, slot, num_slots)
    out = out_ptr + lora_slice * stride_ol + rows.to(tl.int64)[:, None] * stride_ot + r[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (r < rank)[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, buf_ptr, b_ptr, slot_ptr, num_tokens, rank, num_slots,
    size0, size1, size2, size3,
    stride_yt, stride_yd, stride_bl, stride_bt, stride_wl, stride_ws, stride_wd, stride_wr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    lora_slice = tl.program_id(1)
    pid_n = tl.program_id(2)
    size = tl.where(lora_slice == 0, size0,
                    tl.where(lora_slice == 1, size1, tl.where(lora_slice == 2, size2, size3)))
    if pid_n * BLOCK_N >= size:
        return  # a column tile past this (smaller) slice
    offset = (tl.where(lora_slice > 0, size0, 0) + tl.where(lora_slice > 1, size1, 0)
              + tl.where(lora_slice > 2, size2, 0))
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    slots = tl.load(slot_ptr + rows, mask=row_ok, other=-1)
    slot = _next_slot(slots, -1, num_slots)
    if slot >= num_slots:
        return  # no token of the block has an adapter: nothing to add
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < size
    rows64 = rows.to(tl.int64)
    buf = tl.load(buf_ptr + lora_slice.to(tl.int64) * stride_bl + rows64[:, None] * stride_bt
                  + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    b_cols = (b_ptr + lora_slice.to(tl.int64) * stride_wl + cols[None, :] * stride_wd
              + r[:, None] * stride_wr)  # [BLOCK_R, BLOCK_N]: B^T
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    while slot < num_slots:
        b = tl.load(b_cols + slot.to(tl.int64) * stride_ws, mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        mine_buf = tl.where((slots == slot)[:, None], buf, 0.0)
        acc = tl.dot(mine_buf, b, acc, input_precision="ieee")
        slot = _next_slot(slots, slot, num_slots)
    y = y_ptr + rows64[:, None] * stride_yt + (offset + cols)[None, :] * stride_yd
    mask = (row_ok & (slots >= 0))[:, None] & col_ok[None, :]
    old = tl.load(y, mask=mask, other=0.0)
    # The delta rounded once to y's dtype, then added as torch adds two tensors of it.
    new = old.to(tl.float32) + acc.to(old.dtype).to(tl.float32)
    tl.store(y, new.to(old.dtype), mask=mask)


def _block_t(num_tokens: int) -> int:
    """Token rows per program: 16 (the smallest dot) for decode-sized batches, 64 above."""
    return 16 if num_tokens <= 128 else 64


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    num_slices, num_slots, rank, hidden = lora_a.shape
    num_tokens = x.shape[0]
    out = torch.empty(num_slices, num_tokens, rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    block_t = _block_t(num_tokens)
    grid = (triton.cdiv(num_tokens, block_t), num_slices)
    _shrink_kernel[grid](
        x, lora_a, slot_ids, out, num_tokens, hidden, rank, num_slots,
        x.stride(0), x.stride(1), *lora_a.stride(), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_R=_block_r(rank), BLOCK_H=128,
        IEEE=x.dtype == torch.float32, num_warps=4,
    )
    return out


def lora_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor,
                slot_ids: torch.Tensor, slice_sizes: tuple[int, ...]) -> None:
    num_tokens = y.shape[0]
    if num_tokens == 0:
        return
    num_slots, rank = lora_b.shape[1], lora_b.shape[3]
    buf = buf if buf.stride(-1) == 1 else buf.contiguous()  # the kernel reads R contiguously
    block_t = _block_t(num_tokens)
    # 64 x 128 float32 tiles need 8 warps to stay in registers (checked for sm_90 by
    # tests/test_ops_lora.py).
    block_n, num_warps = (64, 4) if num_tokens <= 128 else (128, 8)
    offset = 0
    for first in range(0, len(slice_sizes), MAX_SLICES):
        sizes = tuple(slice_sizes[first:first + MAX_SLICES])
        padded = sizes + (0,) * (MAX_SLICES - len(sizes))
        width = sum(sizes)
        grid = (triton.cdiv(num_tokens, block_t), len(sizes),
                triton.cdiv(max(sizes), block_n))
        out = y[:, offset:offset + width]
        group_buf, group_b = buf[first:first + len(sizes)], lora_b[first:first + len(sizes)]
        _expand_kernel[grid](
            out, group_buf, group_b, slot_ids, num_tokens, rank, num_slots, *padded,
            out.stride(0), out.stride(1), group_buf.stride(0), group_buf.stride(1),
            *group_b.stride(),
            BLOCK_T=block_t, BLOCK_R=_block_r(rank), BLOCK_N=block_n, num_warps=num_warps,
        )
        offset += width
