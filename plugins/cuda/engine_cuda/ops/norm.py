"""RMSNorm and residual-add + RMSNorm in one pass, in Triton.

Rule: the same numbers as the torch reference (`platforms.kernels.rms_norm`): the sum x +
residual is rounded to the input dtype first, the row is normalised in float32 and cast back
to the input dtype, and only then multiplied by the weight (result in the promoted dtype).
One program per row; the row is held in registers (hidden sizes up to 65536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s,
    hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {hidden} > {MAX_HIDDEN}, the one-row-per-program "
                         "limit of this kernel")
    rows = x.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x, residual, weight, eps, out, summed) -> None:
    hidden = x.shape[-1]
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    total = summed if summed is not None else out
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, total, x.stride(0), res.stride(0), out.stride(0), total.stride(0),
        hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden] -> rms_norm(x) * weight, shape of x."""
    rows = _rows(x, "rms_norm")
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows.shape[0]:
        _launch(rows, None, weight, eps, out, None)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), reading x and residual once."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} "
                         f"{residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    rows, res_rows = _rows(x, "fused_add_rms_norm"), _rows(residual, "fused_add_rms_norm")
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    summed = torch.empty_like(rows)
    if rows.shape[0]:
        _launch(rows, res_rows, weight, eps, out, summed)
    return out.view(x.shape), summed.view(x.shape)
