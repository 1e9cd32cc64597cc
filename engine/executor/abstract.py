"""Executors run the workers; the engine core talks to one executor and never to devices.

Rule: every executor offers the same four verbs — load, size the cache, warm up, execute —
so the step loop is identical for one device (`uniproc`) and many (`mp`, `ray`, later).
An executor that can hold several batches at once (pipeline parallelism) says so with
`max_concurrent_batches` > 1 and offers `execute_model_async`, which returns a handle whose
`result()` waits; results are collected in dispatch order.
"""

from __future__ import annotations

import abc

from engine.scheduler.output import ModelRunnerOutput, SchedulerOutput


class DoneBatch:
    """A batch handle whose output is already there."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        return self._output


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

    @property
    def max_concurrent_batches(self) -> int:
        """How many batches may be in flight at once (1: one step at a time)."""
        return 1

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> DoneBatch:
        """Dispatch a batch; the handle's `result()` gives its output (this default runs it
        now, so the handle is already done)."""
        return DoneBatch(self.execute_model(scheduler_output))

    def shutdown(self) -> None:  # noqa: B027 (optional)
        """Release workers and their memory."""
