"""Per-rank traces of what a worker ran: `LLM.start_profile(dir)` ... `stop_profile()`.

Rule: the profiler records whatever torch can see on this machine (`supported_activities`:
the host always, a device when its profiler is there), so the core names no hardware; each
rank writes its own Chrome trace (`<name>.json.gz`, for chrome://tracing or Perfetto) and a
table of its ops by device time (`<name>.txt`, by host time where no device is recorded).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import torch


class TraceProfiler:
    def __init__(self) -> None:
        self._profile: Optional[Any] = None
        self._target: tuple[str, str] = ("", "")
        self._has_device = False  # whether the profile records device time

    def start(self, directory: str, name: str) -> None:
        if self._profile is not None:
            raise RuntimeError("A profile is already being recorded; call stop_profile() "
                               "first.")
        os.makedirs(directory, exist_ok=True)
        activities = list(torch.profiler.supported_activities())
        self._profile = torch.profiler.profile(activities=activities)
        self._profile.start()
        self._target = (directory, name)
        self._has_device = len(activities) > 1

    def stop(self, synchronize: Callable[[], None]) -> list[str]:
        """Wait for the device (`synchronize`), stop, write the trace and the table; their
        paths."""
        if self._profile is None:
            raise RuntimeError("No profile is being recorded; call start_profile() first.")
        synchronize()
        profile, self._profile = self._profile, None
        profile.stop()
        directory, name = self._target
        trace = os.path.join(directory, f"{name}.json.gz")
        profile.export_chrome_trace(trace)
        table = os.path.join(directory, f"{name}.txt")
        sort_by = "self_device_time_total" if self._has_device else "self_cpu_time_total"
        with open(table, "w", encoding="utf-8") as f:
            f.write(profile.key_averages().table(sort_by=sort_by, row_limit=60))
        return [trace, table]
