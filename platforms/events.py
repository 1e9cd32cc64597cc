"""Device events over a torch device module's own event class.

Rule: a helper for `platforms.interface.DeviceEvent`, not part of the contract; a queued
device returns one from `Platform.create_event` instead of writing its own wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from platforms.interface import DeviceEvent


class QueuedDeviceEvent(DeviceEvent):
    """A DeviceEvent over a torch device module's own event class (`torch.cuda.Event`,
    `torch.npu.Event`, ...), recorded on the current stream with timing on: queued devices
    return one from `create_event` instead of writing their own wrapper.

    Example::

        def create_event(self):
            return QueuedDeviceEvent(torch.cuda.Event)
    """

    def __init__(self, event_class: Callable[..., Any]) -> None:
        super().__init__()
        self._event = event_class(enable_timing=True)

    def record(self) -> None:
        self._event.record()

    def synchronize(self) -> None:
        self._event.synchronize()

    def query(self) -> bool:
        return bool(self._event.query())

    def elapsed_ms(self, end: DeviceEvent) -> float:
        if not isinstance(end, QueuedDeviceEvent):
            raise TypeError(f"elapsed_ms needs another QueuedDeviceEvent, got {type(end).__name__}.")
        return float(self._event.elapsed_time(end._event))
