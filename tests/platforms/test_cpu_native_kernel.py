"""The CPU platform's native decode kernel and its torch fallback both pass the kit, and the
native one is really in use where it compiled."""

from __future__ import annotations

import pytest
import torch

from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.native import load_library, native_kernels_status
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec
from platforms.testing import ATTENTION_CASES, check_attention_against_reference


class TorchOnlyBackend(CpuAttentionBackend):
    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.native = None  # force the padded-SDPA path


class TorchOnlyCpuPlatform(CpuPlatform):
    name = "cpu-torch-only"

    def attention_backend(self, spec: AttentionSpec) -> CpuAttentionBackend:
        return TorchOnlyBackend(spec)


def test_native_kernel_compiles_here():
    # This machine (and CI, the same kind) has a C compiler: the fast path must be live.
    assert load_library() is not None, native_kernels_status()
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16)
    assert CpuAttentionBackend(spec).native is not None


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_torch_fallback_matches_reference(case):
    assert check_attention_against_reference(TorchOnlyCpuPlatform(), case) < 1e-4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_kernel_matches_reference_on_fresh_inputs(seed):
    for case in ATTENTION_CASES:
        assert check_attention_against_reference(CpuPlatform(), case, seed=seed) < 1e-4
