"""The CPU platform's named-op overrides: native float32 row kernels (csrc/elementwise.c).

Rule: same meaning as the torch references in `platforms.kernels`, input for input. Each
wrapper takes the native path only for float32 tensors whose last dimension is contiguous
(and the layouts listed on it); anything else goes to the reference, so an override never
narrows what a model may pass. Offered only where the library compiled (ENGINE_CPU_NATIVE=0
turns it off, and the references run).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from platforms import kernels as ref
from platforms.cpu.native import load_library
from platforms.kernels import KernelImpl

_PROVIDER = "cpu-native"
# Above the reference (0) and low among overrides: a plugin kernel offered for the CPU platform
# at 6 or more replaces these.
_PRIORITY = 5
_F32 = torch.float32


def _rows_of(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(n0, n1, s0, s1) describing the rows of a 2-D or 3-D x with a contiguous last dim."""
    if x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    return None


@functools.cache
def _make_ops(lib: ctypes.CDLL) -> dict[str, Callable[..., Any]]:
    rms_norm_f32 = lib.rms_norm_f32
    fused_f32 = lib.fused_add_rms_norm_f32
    rotary_f32 = lib.rotary_neox_f32
    silu_f32 = lib.silu_and_mul_f32
    threads = torch.get_num_threads

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows_of(x) if x.dtype == _F32 and weight.dtype == _F32 else None
        if rows is None or not weight.is_contiguous() or weight.shape != x.shape[-1:]:
            return ref.rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=_F32)
        rms_norm_f32(x.data_ptr(), *rows, weight.data_ptr(), eps, x.shape[-1], out.data_ptr(),
                     threads())
        return out

    def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if (x.dtype != _F32 or residual.dtype != _F32 or weight.dtype != _F32 or x.dim() != 2
                or residual.shape != x.shape or x.stride(-1) != 1 or residual.stride(-1) != 1
                or not weight.is_contiguous() or weight.shape != x.shape[-1:]):
            return ref.fused_add_rms_norm(x, residual, weight, eps)
        rows, n = x.shape
        out = torch.empty((rows, n), dtype=_F32)
        total = torch.empty((rows, n), dtype=_F32)
        fused_f32(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), rows, n,
                  weight.data_ptr(), eps, out.data_ptr(), total.data_ptr(), threads())
        return out, total

    def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (q.dtype != _F32 or k.dtype != _F32 or cos_sin_cache.dtype != _F32
                or positions.dtype != torch.int64 or positions.dim() != 1
                or not positions.is_contiguous() or not cos_sin_cache.is_contiguous()
                or q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1
                or q.shape[0] != positions.shape[0] or k.shape[0] != positions.shape[0]
                or q.shape[-1] != cos_sin_cache.shape[-1] or k.shape[-1] != q.shape[-1]
                or q.shape[-1] % 2):
            return ref.rotary_embedding(positions, q, k, cos_sin_cache)
        status = rotary_f32(positions.data_ptr(), positions.shape[0], q.data_ptr(), q.shape[1],
                            q.stride(0), q.stride(1), k.data_ptr(), k.shape[1], k.stride(0),
                            k.stride(1), cos_sin_cache.data_ptr(), cos_sin_cache.shape[0],
                            q.shape[-1], threads())
        if status != 0:
            t = -1 - status
            raise IndexError(
                f"rotary_embedding: position {int(positions[t])} of token {t} is outside the "
                f"cos/sin cache of {cos_sin_cache.shape[0]} positions (max_position_embeddings)."
            )
        return q, k

    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != _F32 or x.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] % 2:
            return ref.silu_and_mul(x)
        rows, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((rows, d), dtype=_F32)
        silu_f32(x.data_ptr(), x.stride(0), rows, d, out.data_ptr(), threads())
        return out

    return {
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "rotary_embedding": rotary_embedding,
        "silu_and_mul": silu_and_mul,
    }


def native_kernel_overrides(platform_name: str) -> list[KernelImpl]:
    """The native ops for `platform_name`, or [] where the library did not load (the
    references then run; `native_kernels_status()` says why)."""
    lib = load_library()
    if lib is None:
        return []
    only_here = frozenset({platform_name})
    return [KernelImpl(name, fn, _PRIORITY, _PROVIDER, only_here)
            for name, fn in _make_ops(lib).items()]
