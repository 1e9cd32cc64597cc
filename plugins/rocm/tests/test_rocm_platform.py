"""ROCm selection on ROCm's own signals, never on a CUDA machine; engine-cuda's pieces under
the rocm name; the conformance kit where an AMD GPU is (skipped here, with the reason)."""

import importlib.metadata

import pytest
import torch
from engine_cuda.platform import TRITON_KERNELS, CudaPlatform
from engine_rocm.platform import RocmPlatform

from platforms.testing import ATTENTION_CASES, check_attention_against_reference

needs_amd_gpu = pytest.mark.skipif(
    not RocmPlatform.is_available(), reason="needs an AMD GPU and a ROCm build of torch")


@pytest.mark.parametrize("hip, gpu, rocm, cuda", [
    (None, True, False, True),  # a CUDA machine: never ROCm
    ("6.2.41133", True, True, False),  # a ROCm machine: never CUDA
    ("6.2.41133", False, False, False),  # ROCm torch, no GPU
    (None, False, False, False),
])
def test_exactly_one_of_cuda_and_rocm_on_each_machine(monkeypatch, hip, gpu, rocm, cuda):
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert RocmPlatform.is_available() is rocm
    assert CudaPlatform.is_available() is cuda


def test_entry_point_and_capabilities():
    eps = {e.name: e for e in importlib.metadata.entry_points(group="engine.plugins")}
    assert eps["rocm"].value == "engine_rocm" and eps["rocm"].dist.name == "engine-rocm"
    info = RocmPlatform().describe()
    assert info["collectives"] == "nccl (RCCL)" and "HIP" in info["kernels"]
    assert RocmPlatform.device_type == "cuda" and RocmPlatform.capabilities.distributed_backend == "nccl"


def test_kernel_overrides_are_engine_cudas_under_the_rocm_name():
    pytest.importorskip("triton", reason="triton is needed to import the kernels")
    impls = RocmPlatform().kernel_overrides()
    assert {i.name for i in impls} == set(TRITON_KERNELS)
    assert {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
            "apply_token_bitmask"} <= set(TRITON_KERNELS)
    assert all(i.platforms == frozenset({"rocm"}) for i in impls)
    assert all(i.fn.__module__.startswith("engine_cuda.ops") for i in impls)


@needs_amd_gpu
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_attention_on_an_amd_gpu(case):
    check_attention_against_reference(RocmPlatform(), case, dtype=torch.float16)
