"""Async scheduling in the scheduler (torch-free): step N+1 is scheduled before step N's
output is back. Decodes continue on a placeholder token, so the device never waits for the
host; outputs equal one-step-at-a-time scheduling, with EOS, max_tokens, penalties,
preemption and aborts in the mix, and no block or in-flight count leaks.

The fake runner executes a batch when it is dispatched and keeps the tokens it sampled, as
the real worker does on the device; the scheduler sees the output only when the batch is
popped, one step later."""

from __future__ import annotations

from collections import defaultdict

import pytest

from engine.engine_core.batch_queue import BatchQueue, worth_dispatching
from engine.executor.abstract import DoneBatch
from engine.scheduler.request import RequestStatus
from tests.scheduler.scheduler_fakes import (
    FakeRunner,
    make_request,
    make_scheduler,
    run_to_completion,
)

NUM_BLOCKS = 200


def _prompts() -> dict[str, list[int]]:
    return {f"r{i}": [(7 * i + j) % 50 + 10 for j in range(6 + 3 * i)] for i in range(6)}


def _add_all(scheduler, **params) -> None:
    for i, (rid, prompt) in enumerate(_prompts().items()):
        scheduler.add_request(make_request(rid, prompt, arrival=i, **params))


def _async_scheduler(**kwargs):
    scheduler = make_scheduler(**kwargs)
    scheduler.async_scheduling = True
    return scheduler


def run_async(scheduler, runner: FakeRunner, on_dispatch=None):
    """The core's loop with one batch in flight while the next is scheduled; (tokens,
    finish reasons, queue, dispatched batches)."""
    queue = BatchQueue(2)
    tokens: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, str] = {}
    batches = []
    for _ in range(2000):
        if not (scheduler.has_unfinished_requests() or len(queue)):
            break
        while not queue.full:
            out = scheduler.schedule()
            if not worth_dispatching(out, len(queue)):
                break
            in_flight = {r for b, _ in queue._queue for r in b.num_scheduled_tokens}
            assert not out.preempted_req_ids & in_flight, "preempted while in flight"
            for req_id in out.num_scheduled_tokens:
                request = scheduler.requests[req_id]
                assert request.num_output_placeholders <= len(queue) + 1
            batches.append(out)
            queue.push(out, DoneBatch(runner.execute(out)))
            if on_dispatch is not None:
                on_dispatch(scheduler, len(batches))
            if out.is_empty:
                break
        out, result = queue.pop()
        for output in scheduler.update_from_output(out, result).outputs:
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                reasons[output.request_id] = str(output.finish_reason)
    else:
        raise AssertionError("no progress")
    assert not scheduler._in_flight
    return dict(tokens), reasons, queue, batches


def _sequential(num_blocks: int = NUM_BLOCKS, **params):
    scheduler = make_scheduler(num_blocks=num_blocks, max_num_batched_tokens=16)
    _add_all(scheduler, **params)
    result = run_to_completion(scheduler, FakeRunner(num_blocks, 4))
    return result.tokens, {r: str(o.finish_reason) for r, o in result.finished.items()}


def test_decodes_continue_before_the_output_is_back():
    expected, expected_reasons = _sequential(max_tokens=10)
    scheduler = _async_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(scheduler, max_tokens=10)
    tokens, reasons, queue, batches = run_async(scheduler, FakeRunner(NUM_BLOCKS, 4))
    assert tokens == expected and reasons == expected_reasons
    # A request really is in two batches at once: both in flight, the second on a
    # placeholder for the first one's token.
    assert queue.num_overlapped > len(batches) // 2
    assert any(set(a.num_scheduled_tokens) & set(b.num_scheduled_tokens)
               for a, b in zip(batches, batches[1:]))
    assert scheduler.kv_cache.num_free_blocks == NUM_BLOCKS


def test_eos_costs_one_discarded_step_and_nothing_else():
    """EOS is found one step late: the request ran once more, its token is dropped, its
    blocks come back."""
    eos = 12
    def eos_after_three(seen: list[int]) -> int:
        return eos if len(seen) >= len(_prompts()["r0"]) + 3 and seen[0] == 10 else 13

    sync = make_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(sync, max_tokens=10, eos=eos)
    expected = run_to_completion(sync, FakeRunner(NUM_BLOCKS, 4, eos_after_three))
    scheduler = _async_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(scheduler, max_tokens=10, eos=eos)
    tokens, reasons, _, batches = run_async(scheduler, FakeRunner(NUM_BLOCKS, 4,
                                                                  eos_after_three))
    assert tokens == expected.tokens
    assert tokens["r0"][-1] == eos and reasons["r0"] == "stop" and len(tokens["r0"]) == 4
    assert sum("r0" in b.num_scheduled_tokens for b in batches) == 5  # 4 + the discarded one
    assert scheduler.kv_cache.num_free_blocks == NUM_BLOCKS


def test_max_tokens_is_never_overrun():
    """A request whose placeholders reach max_tokens is not scheduled again."""
    scheduler = _async_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(scheduler, max_tokens=5)
    tokens, reasons, _, batches = run_async(scheduler, FakeRunner(NUM_BLOCKS, 4))
    assert all(len(t) == 5 for t in tokens.values())
    assert set(reasons.values()) == {"length"}
    for rid, prompt in _prompts().items():
        computed = sum(b.num_scheduled_tokens.get(rid, 0) for b in batches)
        assert computed == len(prompt) + 4  # the 5th token is sampled, never computed on


def test_penalties_wait_for_their_batch():
    """Sampling with penalties reads the last token: never two batches at once."""
    expected, _ = _sequential(max_tokens=8, repetition_penalty=1.2)
    scheduler = _async_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(scheduler, max_tokens=8, repetition_penalty=1.2)
    tokens, _, _, batches = run_async(scheduler, FakeRunner(NUM_BLOCKS, 4))
    assert tokens == expected
    for a, b in zip(batches, batches[1:]):
        assert not set(a.num_scheduled_tokens) & set(b.num_scheduled_tokens)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_keeps_outputs_and_blocks(caching):
    """Few blocks: victims are never in flight; when every holder is, the step waits."""
    expected, _ = _sequential(max_tokens=12)
    scheduler = _async_scheduler(num_blocks=12, max_num_batched_tokens=16,
                                 enable_prefix_caching=caching)
    _add_all(scheduler, max_tokens=12)
    tokens, _, _, batches = run_async(scheduler, FakeRunner(12, 4))
    assert any(b.preempted_req_ids for b in batches)  # never in flight: run_async checks
    assert tokens == expected
    assert scheduler.kv_cache.num_free_blocks == 12


def test_abort_of_a_request_in_two_batches():
    aborted: list[str] = []

    def abort_once(scheduler, num_dispatched):
        if num_dispatched == 6 and not aborted:
            victim = next(r for r, n in scheduler._in_flight.items() if n == 2)
            scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
            aborted.append(victim)

    scheduler = _async_scheduler(num_blocks=NUM_BLOCKS, max_num_batched_tokens=16)
    _add_all(scheduler, max_tokens=10)
    tokens, reasons, _, batches = run_async(scheduler, FakeRunner(NUM_BLOCKS, 4),
                                            on_dispatch=abort_once)
    (victim,) = aborted
    assert any(victim in b.finished_req_ids for b in batches[6:])
    assert all(victim not in b.num_scheduled_tokens for b in batches[6:])
    assert len(tokens.get(victim, [])) < 10 and victim not in reasons
    assert all(len(t) == 10 for r, t in tokens.items() if r != victim)
    assert scheduler.kv_cache.num_free_blocks == NUM_BLOCKS


def test_async_refuses_pipelining():
    with pytest.raises(ValueError, match="one micro-batch"):
        from engine.scheduler.scheduler import Scheduler
        base = make_scheduler()
        Scheduler(base.config, _cache(), 8, num_micro_batches=2, async_scheduling=True)


def _cache():
    from engine.config import CacheConfig
    return CacheConfig(4, True, kv_cache_memory=None, num_kv_blocks=None,
                       gpu_memory_utilization=0.9)
