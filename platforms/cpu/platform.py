"""The CPU reference platform: every correctness test runs on it, CI included.

Rule: plain torch only, no vendor code. It is registered through the same
`engine_platforms` hook as any third-party platform.
"""

from __future__ import annotations

import os

import torch

from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.ops import native_kernel_overrides
from platforms.interface import (
    ATTENTION_FEATURES,
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    Platform,
)
from platforms.kernels import KernelImpl


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 0  # lowest: any accelerator wins
    capabilities = Capabilities(
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        # The host's memory is everybody's: take 4 GiB unless told (--kv-cache-memory).
        default_kv_cache_memory=4 * 1024**3,
        attention_features=frozenset(ATTENTION_FEATURES),
    )

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return free, total

    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # Half-precision matmuls are slow or missing on most CPUs; compute in float32.
        return torch.float32

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        # Each layer's cache is far above glibc's mmap threshold (32 MiB at most), so it comes
        # from a fresh anonymous mapping, which the kernel zero-fills page by page on first
        # touch. Writing zeros ourselves would touch every page of gigabytes at startup.
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if tensor.numel() * tensor.element_size() < 64 * 1024**2:
            tensor.zero_()  # small enough to come from reused heap memory: clear it
        return tensor

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return CpuAttentionBackend(spec)

    def kernel_overrides(self) -> list[KernelImpl]:
        # Native float32 row kernels where the C library compiled (ENGINE_CPU_NATIVE=0: none).
        return native_kernel_overrides(self.name)
