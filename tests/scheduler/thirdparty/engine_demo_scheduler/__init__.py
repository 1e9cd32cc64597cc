"""Shortest prompt first: a scheduling policy from outside the engine (test fixture).

Written against `engine.scheduler.policy.WaitingQueue` only and registered under the
`engine.schedulers` entry-point group; `--scheduling-policy shortest_prompt` selects it.
"""

from __future__ import annotations

import heapq
import itertools

from engine.scheduler.policy import WaitingQueue


class ShortestPromptFirst(WaitingQueue):
    def __init__(self) -> None:
        self._heap = []
        self._tie = itertools.count()

    def add(self, request) -> None:
        heapq.heappush(self._heap, (request.num_prompt_tokens, next(self._tie), request))

    def prepend(self, request) -> None:
        self.add(request)

    def peek(self):
        return self._heap[0][2]

    def pop(self):
        return heapq.heappop(self._heap)[2]

    def remove(self, requests) -> None:
        gone = {id(r) for r in requests}
        self._heap = [e for e in self._heap if id(e[2]) not in gone]
        heapq.heapify(self._heap)

    def __iter__(self):
        return (e[2] for e in sorted(self._heap, key=lambda e: e[:2]))

    def __len__(self) -> int:
        return len(self._heap)

    def select_victim(self, running):
        return max(running, key=lambda r: r.num_prompt_tokens)
