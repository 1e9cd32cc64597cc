"""Executors run the workers; the engine core talks to one executor and never to devices.

Rule: every executor offers the same four verbs — load, size the cache, warm up, execute —
so the step loop is identical for one device (`uniproc`) and many (`mp`, `ray`, later).
"""

from __future__ import annotations

import abc

from engine.scheduler.output import ModelRunnerOutput, SchedulerOutput


class Executor(abc.ABC):
    @abc.abstractmethod
    def load_model(self) -> None: ...

    @abc.abstractmethod
    def determine_num_blocks(self) -> int:
        """KV-cache blocks every worker can hold (the minimum across workers)."""

    @abc.abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abc.abstractmethod
    def warm_up(self) -> None: ...

    @abc.abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None:  # noqa: B027 (optional)
        """Release workers and their memory."""
