"""A base for platforms driven through a torch-style device module.

Rule: a helper for `platforms.interface.Platform`, not part of the contract: everything a
torch device module answers (count, selection, memory, synchronize, peak memory, events)
written once here instead of once per plugin.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from platforms.events import QueuedDeviceEvent
from platforms.interface import DeviceEvent, Platform


class DeviceModulePlatform(Platform):
    """A platform driven through a torch-style device module (`torch.cuda`, `torch.npu`,
    `habana_frameworks.torch.hpu`, ...): device count and selection, free/total memory,
    synchronize, peak-memory statistics and events all come from `device_module()`, so a
    vendor writes those once here instead of once per plugin. Override what a module lacks.

    Example::

        class MyPlatform(DeviceModulePlatform):
            name, device_type = "my", "mydev"

            def device_module(self):
                import my_torch_ext  # noqa: F401  (adds torch.mydev)
                return torch.mydev
    """

    @abc.abstractmethod
    def device_module(self) -> Any:
        """The module; imported on first use, never at discovery."""

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type, local_rank)

    def device_count(self) -> int:
        return int(self.device_module().device_count())

    def set_device(self, device: torch.device) -> None:
        self.device_module().set_device(device)

    def memory_info(self) -> tuple[int, int]:
        free, total = self.device_module().mem_get_info()
        return int(free), int(total)

    def synchronize(self) -> None:
        self.device_module().synchronize()

    def reset_peak_memory(self) -> None:
        self.device_module().reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        """Peak bytes torch's allocator reserved since `reset_peak_memory` (weights,
        activations, its cache), plus what the device holds outside torch right now (the
        runtime's context and workspaces, other processes), where the module reports it."""
        module = self.device_module()
        peak = int(module.max_memory_reserved())
        reserved = getattr(module, "memory_reserved", None)
        if reserved is None:
            return peak
        free, total = self.memory_info()
        return peak + max(0, total - free - int(reserved()))

    def create_event(self) -> DeviceEvent:
        return QueuedDeviceEvent(self.device_module().Event)
