"""Executors run the workers; the engine core talks to one executor and never to devices.

Rule: every executor offers the same four verbs — load, size the cache, warm up, execute —
so the step loop is identical for one device (`uniproc`) and many (`mp`, `ray`, later).
An executor that can hold several batches at once (pipeline parallelism) says so with
`max_concurrent_batches` > 1 and offers `execute_model_async`, which returns a handle whose
`result()` waits; results are collected in dispatch order.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

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

    # Whether `execute_model_async` returns before the step is done, so the core can schedule
    # the next step meanwhile (async scheduling).
    supports_async_scheduling: bool = False

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> DoneBatch:
        """Dispatch a batch; the handle's `result()` gives its output (this default runs it
        now, so the handle is already done)."""
        return DoneBatch(self.execute_model(scheduler_output))

    def shutdown(self) -> None:  # noqa: B027 (optional)
        """Release workers and their memory."""


class WorkerDiedError(RuntimeError):
    """A worker process (or actor) exited or failed while the engine needed it."""


class RankedExecutor(Executor):
    """An executor over one worker per rank, whatever carries the calls (processes and ZMQ,
    Ray actors): each verb is one `_call` on every rank, answered in rank order. After a
    failure the executor stays failed, and every later call says why."""

    _failure: Optional[str] = None

    @abc.abstractmethod
    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run `method` on every rank; their answers in rank order."""

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(f"The engine's workers failed earlier: {self._failure}")

    def _fail(self, reason: str) -> None:
        self._failure = reason
        raise WorkerDiedError(reason)

    def load_model(self) -> None:
        self._call("load_model")

    def determine_num_blocks(self) -> int:
        return min(self._call("determine_num_blocks"))  # every rank must hold them

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def warm_up(self) -> None:
        self._call("warm_up")
