"""Kernel overrides from torch_npu: rms_norm, fused_add_rms_norm, rotary_embedding,
silu_and_mul (meanings as in `platforms.kernels`).

Rule: torch_npu is imported when an op is first called (on an NPU), never at discovery; the
layout glue around the vendor calls is plain torch (`neox_cos_sin` is tested on the CPU).
"""

from __future__ import annotations

import torch

from platforms.kernels import KernelImpl

NPU_KERNEL_PRIORITY = 10


def neox_cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as `npu_rotary_mul` takes them for `[1, T, heads, D]` inputs: full width
    (each half repeated, the neox layout) and shaped `[1, T, 1, D]`."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    full = [torch.cat([c, c], dim=-1)[None, :, None, :].to(dtype) for c in (cos, sin)]
    return full[0], full[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_rms_norm(x, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    import torch_npu

    out, _, summed = torch_npu.npu_add_rms_norm(x, residual, weight, eps)
    return out, summed


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch_npu

    cos, sin = neox_cos_sin(cos_sin_cache, positions, q.dtype)
    q = torch_npu.npu_rotary_mul(q.unsqueeze(0), cos, sin).squeeze(0)
    k = torch_npu.npu_rotary_mul(k.unsqueeze(0), cos, sin).squeeze(0)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_swiglu(x, dim=-1)


def npu_kernels(platform_name: str) -> list[KernelImpl]:
    ops = {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm,
           "rotary_embedding": rotary_embedding, "silu_and_mul": silu_and_mul}
    return [KernelImpl(name, fn, priority=NPU_KERNEL_PRIORITY, provider="engine-ascend (torch_npu)",
                       platforms=frozenset({platform_name})) for name, fn in ops.items()]
