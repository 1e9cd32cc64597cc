"""The contract's event adapter over a torch-style device event class."""

from __future__ import annotations

import time

import pytest

from platforms.events import QueuedDeviceEvent
from platforms.interface import DeviceEvent


class HostClockEvent:
    """Has the interface of torch.cuda.Event / torch.npu.Event, on the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "the adapter must ask for timing"
        self.t = None
        self.waited = False

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: HostClockEvent) -> float:
        return (end.t - self.t) * 1000.0


def test_queued_event_records_waits_and_times():
    start, end = QueuedDeviceEvent(HostClockEvent), QueuedDeviceEvent(HostClockEvent)
    start.record()
    time.sleep(0.02)
    end.record()
    end.synchronize()
    assert end._event.waited
    assert 15.0 <= start.elapsed_ms(end) < 1000.0


def test_queued_event_refuses_an_event_of_another_kind():
    start = QueuedDeviceEvent(HostClockEvent)
    start.record()
    other = DeviceEvent()
    other.record()
    with pytest.raises(TypeError, match="another QueuedDeviceEvent"):
        start.elapsed_ms(other)
