"""Scheduling policies: the order of the waiting queue and whom to preempt.

Rule: a policy decides only *order*; the scheduler decides *how much*. The waiting queue a
policy returns gives the next request to admit (`peek`/`pop`), and `select_victim` names the
running request to preempt when blocks run out: the one the policy would have admitted last.
`on_scheduled` tells it what each step gave each request, for policies that share by work.

Policies are plugins: a distribution lists `NAME = module:WaitingQueueSubclass` under the
`engine.schedulers` entry-point group and `--scheduling-policy NAME` (or
`LLM(scheduling_policy=NAME)`) selects it. The engine ships its own three (fcfs, priority,
fair) through the same group.
"""

from __future__ import annotations

import abc
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

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

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """`request` computes `num_tokens` tokens this step (every scheduled request, every
        step; the default ignores it)."""
        return None


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


class FairQueue(WaitingQueue):
    """Fair share across tenants (`Request.tenant`, the OpenAI `user`; none is one tenant).

    The tenant served the fewest tokens goes first, its requests in arrival order; the
    victim is the latest request of the most-served tenant running. Starvation is bounded
    the way a fair CPU scheduler bounds it: a tenant that (re)appears starts at the least
    count among tenants waiting, not at zero, so a newcomer cannot hold off the others
    for as long as it takes to catch up with everything they were ever served.
    """

    def __init__(self) -> None:
        self._queues: dict[Optional[str], deque[Request]] = {}
        self._served: dict[Optional[str], int] = {}

    def _served_floor(self) -> int:
        counts = [self._served[t] for t in self._queues]
        return min(counts) if counts else 0

    def _queue_of(self, request: Request) -> deque[Request]:
        tenant = request.tenant
        if tenant not in self._queues:
            floor = self._served_floor()
            self._served[tenant] = max(self._served.get(tenant, 0), floor)
            self._queues[tenant] = deque()
        return self._queues[tenant]

    def add(self, request: Request) -> None:
        self._queue_of(request).append(request)

    def prepend(self, request: Request) -> None:
        self._queue_of(request).appendleft(request)

    def _next_tenant(self) -> Optional[str]:
        return min(self._queues, key=lambda t: (self._served[t], self._queues[t][0].arrival_time))

    def peek(self) -> Request:
        return self._queues[self._next_tenant()][0]

    def pop(self) -> Request:
        tenant = self._next_tenant()
        queue = self._queues[tenant]
        request = queue.popleft()
        if not queue:
            del self._queues[tenant]
        return request

    def remove(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        for tenant in list(self._queues):
            kept = deque(r for r in self._queues[tenant] if id(r) not in gone)
            if kept:
                self._queues[tenant] = kept
            else:
                del self._queues[tenant]

    def __iter__(self) -> Iterator[Request]:
        order = sorted(self._queues, key=lambda t: (self._served[t], self._queues[t][0].arrival_time))
        return (r for tenant in order for r in self._queues[tenant])

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def select_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (self._served.get(r.tenant, 0), r.arrival_time))

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        self._served[request.tenant] = self._served.get(request.tenant, 0) + num_tokens


ENTRY_POINT_GROUP = "engine.schedulers"
# The engine's own, also listed under ENTRY_POINT_GROUP in pyproject.toml; used as they are
# when the package metadata is absent (a source tree on sys.path, not installed).
BUILTIN_POLICIES: dict[str, type[WaitingQueue]] = {
    "fcfs": FCFSQueue, "priority": PriorityQueue, "fair": FairQueue}


def available_policies() -> dict[str, Callable[[], type[WaitingQueue]]]:
    """{name: loader} of every policy: the built-ins and the `engine.schedulers` group."""
    from importlib.metadata import entry_points

    found: dict[str, Callable[[], type[WaitingQueue]]] = {
        name: (lambda cls=cls: cls) for name, cls in BUILTIN_POLICIES.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load
    return found


def create_waiting_queue(policy: str) -> WaitingQueue:
    """The waiting queue of the policy named `policy`."""
    policies = available_policies()
    if policy not in policies:
        raise ValueError(
            f"Unknown scheduling policy {policy!r}; installed: {sorted(policies)} (choose with "
            f"--scheduling-policy; a plugin adds one under the {ENTRY_POINT_GROUP!r} "
            "entry-point group)."
        )
    cls = policies[policy]()
    if not (isinstance(cls, type) and issubclass(cls, WaitingQueue)):
        raise TypeError(f"Scheduling policy {policy!r} is {cls!r}, not a WaitingQueue "
                        "subclass (engine.scheduler.policy.WaitingQueue).")
    return cls()
