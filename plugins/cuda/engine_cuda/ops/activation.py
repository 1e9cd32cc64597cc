"""SiLU-and-mul and GELU(tanh)-and-mul on the merged gate/up projection, in Triton.

Rule: the same numbers as the torch references (`platforms.kernels.silu_and_mul`,
`gelu_tanh_and_mul`): the activation of the gate in float32, rounded to the input dtype,
then times up (one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    # 0.5 * g * (1 + tanh(u)) == g * sigmoid(2u): no cancellation for very negative g.
    u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    act = (gate / (1.0 + tl.exp(-2.0 * u))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate then up) -> [..., d] = silu(gate) * up."""
    return _gated(x, _silu_and_mul_kernel, "silu_and_mul")


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate then up) -> [..., d] = gelu_tanh(gate) * up (HF gelu_pytorch_tanh)."""
    return _gated(x, _gelu_tanh_and_mul_kernel, "gelu_tanh_and_mul")


def _gated(x: torch.Tensor, kernel: triton.JITFunction, name: str) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"{name}: last dimension {x.shape[-1]} is not even (gate, up)")
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if rows.shape[0] and d:
        grid = (rows.shape[0], triton.cdiv(d, BLOCK))
        kernel[grid](rows, out, rows.stride(0), out.stride(0), d, BLOCK=BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], d)
