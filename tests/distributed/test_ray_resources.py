"""What a rank reserves on Ray comes from the platform's `capabilities.ray_device_resource`,
not from comparing device types (a Spyre rank has host tensors but needs its card)."""

import dataclasses

from engine.executor.ray import _actor_options, rank_bundle
from platforms.cpu.platform import CpuPlatform


class _CardOnHostTensors(CpuPlatform):
    name = "cardlike"
    capabilities = dataclasses.replace(CpuPlatform.capabilities, ray_device_resource="spyre")


class _Gpu(CpuPlatform):
    name = "gpulike"
    device_type = "cuda"
    capabilities = dataclasses.replace(CpuPlatform.capabilities, ray_device_resource="GPU")


def test_each_platform_reserves_its_own_resource(monkeypatch):
    monkeypatch.delenv("ENGINE_RAY_DEVICE_RESOURCE", raising=False)
    assert rank_bundle(CpuPlatform()) == {"CPU": 1.0}
    assert rank_bundle(_CardOnHostTensors()) == {"spyre": 1.0}
    assert rank_bundle(_Gpu()) == {"GPU": 1.0}
    assert _actor_options(None) == {"num_cpus": 1.0}
    assert _actor_options("GPU") == {"num_cpus": 0.0, "num_gpus": 1.0}
    assert _actor_options("spyre") == {"num_cpus": 0.0, "resources": {"spyre": 1.0}}
    monkeypatch.setenv("ENGINE_RAY_DEVICE_RESOURCE", "my_card")
    assert rank_bundle(_Gpu()) == {"my_card": 1.0}


def test_every_shipped_accelerator_plugin_names_a_resource():
    import importlib

    for module, cls in [("engine_cuda.platform", "CudaPlatform"),
                        ("engine_rocm.platform", "RocmPlatform"),
                        ("engine_tpu.platform", "TpuPlatform"),
                        ("engine_ascend.platform", "AscendPlatform"),
                        ("engine_gaudi.platform", "GaudiPlatform"),
                        ("engine_spyre.platform", "SpyrePlatform")]:
        platform_cls = getattr(importlib.import_module(module), cls)
        assert platform_cls.capabilities.ray_device_resource, module
