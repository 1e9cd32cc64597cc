"""Pipeline parallelism: which layers a stage holds, how activations cross stages, and the
queue of micro-batches the engine core keeps in flight.

Rule: stage s of `pp` holds a contiguous range of decoder layers (earlier stages take one
more when the count does not divide); the first stage also embeds, the last also norms,
projects to logits and samples. Between stages, hidden states and the residual travel as
one [2, num_tokens, hidden] tensor over the PP group's communicator, each stage handling
batches in the order the executor sent them. The core keeps up to `pp` batches in flight
(`BatchQueue`): it schedules batch k+1 while batch k is still in the pipeline, and a
request is never in two batches at once (the scheduler skips requests in flight).

This module imports torch only inside the functions that move tensors; `BatchQueue` and
the split checks are plain Python.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    import torch

    from engine.distributed.parallel_state import ParallelContext
    from engine.scheduler.output import ModelRunnerOutput, SchedulerOutput


# ---- layers per stage ---------------------------------------------------------------------

def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The decoder layers stage `pp_rank` holds: contiguous, sizes differing by at most one
    (earlier stages take the extra ones)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"Pipeline stage {pp_rank} is outside {pp_size} stages.")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def check_pipeline_parallel(num_layers: int, pp_size: int) -> list[str]:
    """Problems splitting `num_layers` decoder layers over `pp_size` stages (empty: fine)."""
    if pp_size < 1:
        return [f"--pipeline-parallel-size must be at least 1, got {pp_size}"]
    if num_layers < pp_size:
        return [f"num_hidden_layers ({num_layers}) is smaller than --pipeline-parallel-size "
                f"({pp_size}): every stage needs at least one layer"]
    return []


@dataclass(frozen=True)
class Stage:
    """This rank's place in the pipeline and the layers it holds."""

    rank: int = 0
    size: int = 1
    layers: range = range(0)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @staticmethod
    def of(ctx: ParallelContext, num_layers: int) -> Stage:
        return Stage(ctx.pp_rank, ctx.pp_size, stage_layers(num_layers, ctx.pp_size,
                                                            ctx.pp_rank))


# ---- activations between stages ---------------------------------------------------------

def send_activations(ctx: ParallelContext, hidden: torch.Tensor,
                     residual: torch.Tensor) -> None:
    """Send this stage's output (hidden, residual) to the next stage."""
    import torch

    assert ctx.pp_comm is not None and ctx.pp_rank < ctx.pp_size - 1
    ctx.pp_comm.send(torch.stack((hidden, residual)), dst=ctx.pp_rank + 1)


def recv_activations(ctx: ParallelContext, num_tokens: int, hidden_size: int,
                     dtype: torch.dtype, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive the previous stage's (hidden, residual) for `num_tokens` tokens."""
    import torch

    assert ctx.pp_comm is not None and ctx.pp_rank > 0
    buf = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
    ctx.pp_comm.recv(buf, src=ctx.pp_rank - 1)
    return buf[0], buf[1]


# ---- micro-batches in flight (engine core side, torch-free) -----------------------------

class BatchHandle(Protocol):
    """What an executor's `execute_model_async` returns."""

    def result(self) -> ModelRunnerOutput: ...


@dataclass
class BatchQueue:
    """Batches dispatched to the executor and not yet collected, oldest first.

    `max_in_flight` and `num_overlapped` record what really happened: the most batches
    outstanding at once, and how many were dispatched while an older one was still
    outstanding (0 for a one-batch-at-a-time pipeline)."""

    depth: int
    _queue: collections.deque[tuple[SchedulerOutput, BatchHandle]] = field(
        default_factory=collections.deque)
    max_in_flight: int = 0
    num_overlapped: int = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.depth

    def push(self, scheduler_output: SchedulerOutput, handle: BatchHandle) -> None:
        """Record a dispatched batch (empty steps, which only carry finished ids, do not
        count towards the statistics)."""
        self._queue.append((scheduler_output, handle))
        working = sum(not out.is_empty for out, _ in self._queue)
        if not scheduler_output.is_empty and working > 1:
            self.num_overlapped += 1
        self.max_in_flight = max(self.max_in_flight, working)

    def pop(self) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        """Wait for the oldest batch; its scheduler output and result."""
        scheduler_output, handle = self._queue.popleft()
        return scheduler_output, handle.result()


def worth_dispatching(scheduler_output: SchedulerOutput, queue_len: int) -> bool:
    """An empty step is sent only when nothing else is in flight (to keep the one-batch
    behaviour) or when it carries ids the workers must forget."""
    if not scheduler_output.is_empty or queue_len == 0:
        return True
    return bool(scheduler_output.finished_req_ids or scheduler_output.preempted_req_ids)


def stage_tokens(output: Optional[Any]) -> dict[str, list[int]]:
    """{req_id: tokens sampled} of a runner output, for stages that did not sample."""
    if output is None:
        return {}
    return {r: list(t) for r, t in zip(output.req_ids, output.sampled_token_ids, strict=True)
            if t}
