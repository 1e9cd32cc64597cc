"""The Huawei Ascend platform over torch_npu: `npu` device, fused paged attention, ACL
graphs for decode (opt-in), HCCL collectives, torch_npu kernel overrides.

Rule: discovery imports torch_npu only where it is installed (`is_available` finds the
package, then asks `torch.npu` for a device); every other torch_npu use is imported where it
is called. Without an Ascend NPU this platform is never selected.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from platforms.communicator import TorchDistributedCommunicator
from platforms.device_module import DeviceModulePlatform
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    Communicator,
    GraphRunner,
    ModelForward,
)
from platforms.kernels import KernelImpl

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

ACL_GRAPH_ENV = "ENGINE_ASCEND_ACL_GRAPH"
BLOCK_ALIGN = 16  # the paged fused ops take block sizes in multiples of 16


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401  (adds torch.npu)

        return bool(torch.npu.is_available())
    except (ImportError, RuntimeError, AttributeError):  # a broken install counts as absent
        return False


def _npu():
    import torch_npu  # noqa: F401

    return torch.npu


class HcclCommunicator(TorchDistributedCommunicator):
    """torch.distributed over HCCL (the backend torch_npu registers on import)."""

    def __init__(self, group) -> None:
        _npu()
        super().__init__(group)


class AscendPlatform(DeviceModulePlatform):
    name = "ascend"
    device_type = "npu"
    priority = 80
    capabilities = Capabilities(
        dtypes=(torch.bfloat16, torch.float16),
        graph_capture=f"ACL graphs for decode batches (opt-in: {ACL_GRAPH_ENV}=1); eager otherwise",
        distributed_backend="hccl",
        ray_device_resource="NPU",  # what Ray detects on an Ascend host
        measures_peak_memory=True,
        notes={"attention": "torch_npu fused infer attention (TND) / paged decode over a "
                            "block cache"},
    )

    @classmethod
    def is_available(cls) -> bool:
        return npu_available()

    # ---- device & memory: DeviceModulePlatform over torch.npu ----
    def device_module(self):
        return _npu()

    # ---- config ----
    def validate(self, config: PlatformConfig) -> list[str]:
        problems = super().validate(config)
        block_size = config.block_size
        if block_size % BLOCK_ALIGN:
            problems.append(
                f"block size {block_size} is not a multiple of {BLOCK_ALIGN}, which the "
                f"torch_npu paged attention ops need; pass --block-size 128 (or another "
                f"multiple of {BLOCK_ALIGN}).")
        return problems

    @staticmethod
    def acl_graphs_enabled(config: PlatformConfig) -> bool:
        return (not config.enforce_eager
                and os.environ.get(ACL_GRAPH_ENV, "") not in ("", "0"))

    # ---- factories ----
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        from engine_ascend.attention import AscendAttentionBackend

        return AscendAttentionBackend(spec)

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> GraphRunner:
        from engine_ascend.graph import AclGraphRunner, NpuGraph

        if not self.acl_graphs_enabled(config):
            return GraphRunner(forward, config, attention)
        return AclGraphRunner(forward, config, attention, make_graph=NpuGraph)

    def communicator(self, group) -> Communicator:
        return HcclCommunicator(group)

    def kernel_overrides(self) -> list[KernelImpl]:
        from engine_ascend.ops import npu_kernels

        return npu_kernels(self.name)

    def describe(self) -> dict[str, Optional[str]]:
        info = super().describe()
        info["kernels"] = str(info["kernels"]) + " (torch_npu)"
        return info
