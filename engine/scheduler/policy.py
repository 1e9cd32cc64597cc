"""Scheduling policies: the order of the waiting queue and whom to preempt.

Rule: a policy decides only *order*; the scheduler decides *how much*. The waiting queue a
policy returns gives the next request to admit (`peek`/`pop`), and `select_victim` names the
running request to preempt when blocks run out: the one the policy would have admitted last.
"""

from __future__ import annotations

import abc
import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from engine.scheduler.request import Request


class WaitingQueue(abc.ABC):
    """Requests waiting to be (re)admitted, in the policy's order."""

    @abc.abstractmethod
    def add(self, request: Request) -> None:
        """A newly arrived request."""

    @abc.abstractmethod
    def prepend(self, request: Request) -> None:
        """A preempted request, which should be readmitted as early as the policy allows."""

    @abc.abstractmethod
    def peek(self) -> Request: ...

    @abc.abstractmethod
    def pop(self) -> Request: ...

    @abc.abstractmethod
    def remove(self, requests: Iterable[Request]) -> None: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """In admission order."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def select_victim(self, running: list[Request]) -> Request:
        """The running request to preempt (running is non-empty, in scheduling order)."""


class FCFSQueue(WaitingQueue):
    """First come, first served; the latest arrival is preempted first."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._queue = deque(r for r in self._queue if id(r) not in gone)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def select_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: r.arrival_time)


class PriorityQueue(WaitingQueue):
    """Lower `priority` value first, then earlier arrival; the worst one is preempted first.

    A preempted request keeps its (priority, arrival) key, so "front" means its rightful
    place in that order rather than literally first.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()  # tie-break so Requests are never compared

    def add(self, request: Request) -> None:
        entry = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._heap, entry)

    def prepend(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._heap = [entry for entry in self._heap if id(entry[3]) not in gone]
        heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap))

    def __len__(self) -> int:
        return len(self._heap)

    def select_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival_time))


_POLICIES: dict[str, type[WaitingQueue]] = {"fcfs": FCFSQueue, "priority": PriorityQueue}


def create_waiting_queue(policy: str) -> WaitingQueue:
    """The waiting queue of a policy name ('fcfs' or 'priority')."""
    if policy not in _POLICIES:
        raise ValueError(
            f"Unknown scheduling policy {policy!r}; choose one of {sorted(_POLICIES)} with "
            "--scheduling-policy."
        )
    return _POLICIES[policy]()
