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

from engine.config import EngineConfig
from engine.messages.step import ModelRunnerOutput, SchedulerOutput


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

    @property
    def supports_async_scheduling(self) -> bool:
        """Whether `execute_model_async` returns before the step is done, so the core can
        schedule the next step meanwhile (async scheduling)."""
        return False

    @property
    def supports_deferred_bitmask(self) -> bool:
        """Whether a step may be dispatched before its grammar bitmask is known
        (`SchedulerOutput.grammar_deferred`): the handle then has `sample(bitmask)`."""
        return False

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> DoneBatch:
        """Dispatch a batch; the handle's `result()` gives its output (this default runs it
        now, so the handle is already done)."""
        return DoneBatch(self.execute_model(scheduler_output))

    @abc.abstractmethod
    def start_profile(self, directory: str) -> None:
        """Start recording a trace on every worker."""

    @abc.abstractmethod
    def stop_profile(self) -> list[str]:
        """Stop recording; the files every worker wrote (a trace and a table each)."""

    def take_expert_load(self) -> Optional[list[int]]:
        """Token-slots routed to each global expert since the last take, summed over the
        model's expert-parallel MoE layers; None without one (this default: none)."""
        return None

    def shutdown(self) -> None:  # noqa: B027 (optional)
        """Release workers and their memory."""


class WorkerDiedError(RuntimeError):
    """A worker process (or actor) exited or failed while the engine needed it."""


class RankedExecutor(Executor):
    """An executor over one worker per rank, whatever carries the calls (processes and ZMQ,
    Ray actors): each verb is one call on every rank, answered in rank order. After a
    failure the executor stays failed, and every later call says why.

    Calls may overlap: `execute_model_async` submits a step and returns a handle at once
    (pipeline parallelism keeps one batch per stage in flight; async scheduling one more
    step). Every rank answers calls in the order it got them. The step output used is the
    first rank of the last pipeline stage's; every stage learns what it sampled from the
    scheduler's next output."""

    _failure: Optional[str] = None

    def _set_layout(self, config: EngineConfig) -> None:
        """Sizes the step plumbing needs (subclasses call it first)."""
        parallel = config.parallel
        self.world_size = parallel.world_size
        self.pp_size = parallel.pipeline_parallel_size
        self.tp_size = parallel.tensor_parallel_size
        # The rank whose answer is the step's output: the first of the last stage.
        self.output_rank = (self.pp_size - 1) * parallel.tensor_parallel_size

    @abc.abstractmethod
    def _submit(self, method: str, *args: Any) -> Any:
        """Send `method(*args)` to every rank; what `_collect` needs to find the answers."""

    @abc.abstractmethod
    def _collect(self, method: str, submitted: Any) -> list[Any]:
        """Every rank's answer to a submitted call, in rank order."""

    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run `method` on every rank; their answers in rank order."""
        return self._collect(method, self._submit(method, *args))

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

    def start_profile(self, directory: str) -> None:
        self._call("start_profile", directory)

    def stop_profile(self) -> list[str]:
        return [path for paths in self._call("stop_profile") for path in paths]

    def take_expert_load(self) -> Optional[list[int]]:
        """Every rank takes (and zeroes) its counts; routing is replicated over a stage's
        tensor-parallel ranks, so each stage's first rank speaks for it, and the stages
        (different layers) add up."""
        loads = self._call("take_expert_load")[::self.tp_size]
        counted = [load for load in loads if load is not None]
        if not counted:
            return None
        return [sum(per_stage) for per_stage in zip(*counted, strict=True)]

    # ---- steps ----
    @property
    def max_concurrent_batches(self) -> int:
        return self.pp_size  # one batch per pipeline stage

    @property
    def supports_async_scheduling(self) -> bool:
        return self.pp_size == 1  # workers answer a step once its tokens are back

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingStep:
        return PendingStep(self, self._submit("execute_model", scheduler_output))

    def _step_result(self, submitted: Any) -> ModelRunnerOutput:
        return self._collect("execute_model", submitted)[self.output_rank]


class PendingStep:
    """A step submitted to every rank; `result()` waits for its output (once)."""

    def __init__(self, executor: RankedExecutor, submitted: Any) -> None:
        self._executor, self._submitted = executor, submitted
        self._output: Optional[ModelRunnerOutput] = None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._executor._step_result(self._submitted)
        return self._output
