"""The scheduler with micro-batches in flight (torch-free): a request is never in two
batches at once, never preempted while in flight, batches share the requests, and the
outputs equal one-batch-at-a-time scheduling, with preemption and aborts in the mix.

The fake runner executes each batch when it is dispatched, in dispatch order, as pipeline
stages do; its output is applied only when the batch is popped from the queue."""

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


def _prompts() -> dict[str, list[int]]:
    return {f"r{i}": [(7 * i + j) % 50 for j in range(6 + 3 * i)] for i in range(6)}


def _add_all(scheduler, max_tokens: int = 10) -> None:
    for i, (rid, prompt) in enumerate(_prompts().items()):
        scheduler.add_request(make_request(rid, prompt, arrival=i, max_tokens=max_tokens))


def run_pipelined(scheduler, runner: FakeRunner, depth: int, on_dispatch=None):
    """The core's pipelined loop over the fake runner; (tokens, queue, dispatched batches)."""
    queue = BatchQueue(depth)
    tokens: dict[str, list[int]] = defaultdict(list)
    batches = []
    in_flight: dict[str, int] = {}  # req_id -> batch index, for the "never twice" check
    for _ in range(2000):
        if not (scheduler.has_unfinished_requests() or len(queue)):
            break
        while not queue.full:
            out = scheduler.schedule()
            if not worth_dispatching(out, len(queue)):
                break
            for req_id in out.preempted_req_ids:
                assert req_id not in in_flight, f"{req_id} preempted while in flight"
            for req_id in out.num_scheduled_tokens:
                assert req_id not in in_flight, f"{req_id} scheduled while in flight"
                in_flight[req_id] = len(batches)
            batches.append(out)
            queue.push(out, DoneBatch(runner.execute(out)))
            if on_dispatch is not None:
                on_dispatch(scheduler, len(batches))
            if out.is_empty:
                break
        out, result = queue.pop()
        for req_id in out.num_scheduled_tokens:
            del in_flight[req_id]
        for output in scheduler.update_from_output(out, result).outputs:
            tokens[output.request_id].extend(output.new_token_ids)
    else:
        raise AssertionError("no progress")
    return dict(tokens), queue, batches


def test_two_batches_share_the_requests_and_give_the_same_tokens():
    sequential = make_scheduler(num_blocks=200)
    _add_all(sequential)
    expected = run_to_completion(sequential, FakeRunner(200, 4)).tokens

    scheduler = make_scheduler(num_blocks=200)
    scheduler.num_micro_batches = 2
    _add_all(scheduler)
    tokens, queue, batches = run_pipelined(scheduler, FakeRunner(200, 4), depth=2)
    assert tokens == expected
    assert queue.max_in_flight == 2 and queue.num_overlapped > len(batches) // 2
    # 6 requests over two micro-batches: at most 3 each.
    assert max(len(b.num_scheduled_tokens) for b in batches) == 3
    assert scheduler.kv_cache.num_free_blocks == 200


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_with_batches_in_flight_keeps_outputs_and_blocks(caching):
    """Few blocks: requests get preempted while others are in flight; the victims are never
    the in-flight ones (their KV is being written), outputs equal a roomy run."""
    roomy = make_scheduler(num_blocks=200, max_num_batched_tokens=16,
                           enable_prefix_caching=caching)
    _add_all(roomy, max_tokens=12)
    expected = run_to_completion(roomy, FakeRunner(200, 4)).tokens

    scheduler = make_scheduler(num_blocks=12, max_num_batched_tokens=16,
                               enable_prefix_caching=caching)
    scheduler.num_micro_batches = 2
    _add_all(scheduler, max_tokens=12)
    tokens, queue, batches = run_pipelined(scheduler, FakeRunner(12, 4), depth=2)
    assert any(b.preempted_req_ids for b in batches)
    assert queue.num_overlapped > 0
    assert tokens == expected
    assert scheduler.kv_cache.num_free_blocks == 12


def test_abort_of_a_request_in_flight():
    """Aborted while its batch is in the pipeline: its blocks are freed, its late output is
    dropped, and the workers are told to forget it with the next batch."""
    aborted: list[str] = []

    def abort_once(scheduler, num_dispatched):
        if num_dispatched == 2 and not aborted:
            victim = next(iter(scheduler._in_flight))
            scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
            aborted.append(victim)

    scheduler = make_scheduler(num_blocks=200)
    scheduler.num_micro_batches = 2
    _add_all(scheduler)
    tokens, _, batches = run_pipelined(scheduler, FakeRunner(200, 4), depth=2,
                                       on_dispatch=abort_once)
    (victim,) = aborted
    assert any(victim in b.finished_req_ids for b in batches[2:])
    assert all(victim not in b.num_scheduled_tokens for b in batches[2:])
    assert len(tokens.get(victim, [])) < 10
    assert all(len(t) == 10 for r, t in tokens.items() if r != victim)
    assert scheduler.kv_cache.num_free_blocks == 200 and not scheduler._in_flight
