"""A request's grammar held back while the model reasons: the constraint is the answer's.

Rule: the gate is a `Grammar` around the real one. While the output is inside the reasoning
every token is allowed and the grammar sees none; the end marker's tokens switch to the
grammar. When the prompt leaves the output free to open a reasoning block, the first token
may be the start marker (besides what the grammar allows). Rollback undoes phase changes too.
"""

from __future__ import annotations

from typing import Any

from engine.structured_outputs.backend import Grammar

PENDING, REASONING, ANSWER = "pending", "reasoning", "answer"


def _set_bit(bitmask: Any, row: int, token_id: int) -> None:
    bit = 1 << (token_id % 32)
    bitmask[row, token_id // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit


class ReasoningGate(Grammar):
    def __init__(self, inner: Grammar, start_ids: list[int], end_ids: list[int],
                 open_at_start: bool) -> None:
        self._inner = inner
        self._start = start_ids[0] if len(start_ids) == 1 else None
        self._end = list(end_ids)
        self._tail: list[int] = []  # the reasoning's last tokens (to spot the end marker)
        if open_at_start:
            self.phase = REASONING
        else:
            self.phase = PENDING if self._start is not None else ANSWER
        self._history: list[tuple[str, bool, list[int]]] = []  # (phase, to inner, tail)

    def accept_token(self, token_id: int) -> bool:
        phase, tail = self.phase, list(self._tail)
        if phase == ANSWER or (phase == PENDING and token_id != self._start):
            if not self._inner.accept_token(token_id):
                return False
            self.phase = ANSWER
            self._history.append((phase, True, tail))
            return True
        if phase == PENDING:
            self.phase = REASONING
        else:
            self._tail = (self._tail + [token_id])[-len(self._end):] if self._end else []
            if self._end and self._tail == self._end:
                self.phase = ANSWER
        self._history.append((phase, False, tail))
        return True

    def rollback(self, num_tokens: int) -> None:
        for _ in range(num_tokens):
            phase, to_inner, tail = self._history.pop()
            if to_inner:
                self._inner.rollback(1)
            self.phase, self._tail = phase, tail

    def is_terminated(self) -> bool:
        return self.phase == ANSWER and self._inner.is_terminated()

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        if self.phase == REASONING:
            bitmask[row] = -1
            return
        self._inner.fill_bitmask(bitmask, row)
        if self.phase == PENDING:
            _set_bit(bitmask, row, self._start)
