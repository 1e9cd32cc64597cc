"""Batches in flight between the engine core and its executor (torch-free).

Rule: one queue serves both ways of keeping the device busy. Pipeline parallelism keeps up
to `pp` batches in flight (batch k+1 is scheduled while batch k is in the pipeline); async
scheduling keeps two (step N+1 is scheduled and launched while step N runs). Either way a
request is never in two batches at once unless the scheduler placed a placeholder for it,
and batches come back in the order they went out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional, Protocol

from engine.messages.step import ModelRunnerOutput, SchedulerOutput


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

    def pending(self, limit: Optional[int] = None) -> list[tuple[SchedulerOutput, BatchHandle]]:
        """The batches in flight, oldest first (the first `limit` of them)."""
        items = list(self._queue)
        return items if limit is None else items[:limit]

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
