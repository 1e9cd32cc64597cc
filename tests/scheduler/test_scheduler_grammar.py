"""The scheduler's side of structured outputs, with a scripted grammar (torch-free): it
advances the matcher with each accepted token, sends a bitmask row only for requests that
sample under a grammar, ends a request whose language is complete (even with ignore_eos)
and one whose grammar allows nothing more, with finish_reason stop."""

from __future__ import annotations

import numpy as np
from scheduler_fakes import FakeRunner, counting_next_token, make_request, run_to_completion

from engine.messages.core import FinishReason
from engine.scheduler.scheduler import Scheduler


class ScriptedGrammar:
    """Accepts any token; terminated after `length` tokens; a dead end after `dead_after`."""

    def __init__(self, length: int = 99, dead_after: int = 99) -> None:
        self.accepted: list[int] = []
        self.length, self.dead_after = length, dead_after

    def accept_token(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True

    def rollback(self, num_tokens: int) -> None:
        del self.accepted[-num_tokens:]

    def is_terminated(self) -> bool:
        return len(self.accepted) >= self.length

    def fill_bitmask(self, bitmask, row: int) -> None:
        bitmask[row] = 0 if len(self.accepted) >= self.dead_after else -1


def _scheduler(rows_seen: list) -> Scheduler:
    from scheduler_fakes import make_scheduler

    scheduler = make_scheduler()

    def bitmask(grammars):
        rows_seen.append(len(grammars))
        mask = np.zeros((len(grammars), 2), dtype=np.int32)
        for i, grammar in enumerate(grammars):
            grammar.fill_bitmask(mask, i)
        return mask, [i for i in range(len(grammars)) if not mask[i].any()]

    scheduler._bitmask = bitmask
    return scheduler


def test_grammar_advances_ends_complete_languages_and_dead_ends_as_stop():
    rows_seen: list[int] = []
    scheduler = _scheduler(rows_seen)
    complete, dead = ScriptedGrammar(length=3), ScriptedGrammar(dead_after=2)
    for req_id, grammar in (("complete", complete), ("dead", dead), ("plain", None)):
        request = make_request(req_id, list(range(10, 17)), max_tokens=8, ignore_eos=True)
        request.grammar = grammar
        scheduler.add_request(request)
    result = run_to_completion(scheduler, FakeRunner(64, 4, counting_next_token))
    assert len(result.tokens["complete"]) == 3 and complete.accepted == result.tokens["complete"]
    assert len(result.tokens["dead"]) == 2  # the third sample is discarded
    assert len(result.tokens["plain"]) == 8
    reasons = {r: o.finish_reason for r, o in result.finished.items()}
    assert reasons == {"complete": FinishReason.STOP, "dead": FinishReason.STOP,
                       "plain": FinishReason.LENGTH}
    # A row for each structured request that samples (the 7-token prompts fit one step).
    assert rows_seen and max(rows_seen) == 2
    assert all(set(step.structured_req_ids) <= {"complete", "dead"} for step in result.steps)
    assert scheduler.kv_cache.num_free_blocks == 64  # every block released
