"""Static batching (`platforms.scheduling.StaticBatching`): every step fits a warmed-up shape."""

import pytest
from scheduler_fakes import FakeRunner, make_request, make_scheduler, run_to_completion

from platforms.scheduling import StaticBatching, StaticShape

SMALL = StaticShape(batch_size=2, prompt_len=8, new_tokens=4)
LONG = StaticShape(batch_size=1, prompt_len=24, new_tokens=6)


def constrained(*shapes: StaticShape, **kwargs):
    scheduler = make_scheduler(**kwargs)
    scheduler.constraints = StaticBatching(shapes or (SMALL, LONG), how_to_change="set SHAPES")
    return scheduler


def assert_steps_fit_shapes(result, shapes):
    running: set[str] = set()
    for out in result.steps:
        running -= out.finished_req_ids  # finished in the previous step's update
        new = {n.req_id: n for n in out.scheduled_new_reqs}
        if new:
            # A prefill step: only new requests, whole prompts from position 0, one shape.
            assert not running, "a batch was admitted while another was still running"
            assert set(out.num_scheduled_tokens) == set(new)
            for req_id, n in new.items():
                assert n.num_computed_tokens == 0
                assert out.num_scheduled_tokens[req_id] == len(n.prompt_token_ids)
            longest = max(len(n.prompt_token_ids) for n in new.values())
            assert any(len(new) <= s.batch_size and longest <= s.prompt_len for s in shapes)
            running = set(new)
        else:
            assert all(n == 1 for n in out.num_scheduled_tokens.values()), out
            assert set(out.num_scheduled_tokens) == running  # every member decodes


def test_batches_form_only_when_the_previous_one_is_done_and_outputs_are_unchanged():
    prompts = {f"r{i}": list(range(10 * i, 10 * i + 3 + i)) for i in range(5)}
    free, static = make_scheduler(), constrained()
    for scheduler in (free, static):
        for i, (req_id, prompt) in enumerate(prompts.items()):
            scheduler.add_request(make_request(req_id, prompt, arrival=i, max_tokens=4))
    reference = run_to_completion(free, FakeRunner(64, 4))
    result = run_to_completion(static, FakeRunner(64, 4))
    assert result.tokens == reference.tokens  # same tokens, only the batching differs
    assert result.num_preemptions == 0
    assert_steps_fit_shapes(result, (SMALL, LONG))
    admitted = [[n.req_id for n in out.scheduled_new_reqs] for out in result.steps
                if out.scheduled_new_reqs]
    assert admitted == [["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_head_picks_the_smallest_shape_and_a_longer_follower_waits_for_the_next_batch():
    scheduler = constrained()
    scheduler.add_request(make_request("short", [1, 2, 3], arrival=0, max_tokens=2))
    scheduler.add_request(make_request("long", list(range(20)), arrival=1, max_tokens=2))
    scheduler.add_request(make_request("short2", [4, 5], arrival=2, max_tokens=2))
    result = run_to_completion(scheduler, FakeRunner(64, 4))
    admitted = [[n.req_id for n in out.scheduled_new_reqs] for out in result.steps
                if out.scheduled_new_reqs]
    # FCFS: "short2" fits SMALL but may not skip ahead of "long".
    assert admitted == [["short"], ["long"], ["short2"]]
    assert_steps_fit_shapes(result, (SMALL, LONG))


def test_a_request_fitting_no_shape_is_refused_with_the_shapes_and_the_hint():
    scheduler = constrained()
    with pytest.raises(ValueError, match=r"2x8x4, 1x24x6.*set SHAPES"):
        scheduler.add_request(make_request("big", list(range(30)), max_tokens=2))
    with pytest.raises(ValueError, match="up to 7 new tokens"):
        scheduler.add_request(make_request("chatty", [1, 2], max_tokens=7))
    assert not scheduler.has_unfinished_requests()


def test_unset_max_tokens_counts_as_up_to_max_model_len():
    scheduler = constrained(max_model_len=30)
    with pytest.raises(ValueError, match="up to 27 new tokens"):
        scheduler.add_request(make_request("r", [1, 2, 3], max_tokens=None))


def test_members_join_only_with_blocks_for_their_longest_sequence():
    # Each request may grow to 8 + 4 = 12 tokens = 3 blocks; 5 blocks hold one at a time.
    scheduler = constrained(SMALL, num_blocks=5)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", list(range(8)), arrival=i, max_tokens=4))
    result = run_to_completion(scheduler, FakeRunner(5, 4))
    assert result.num_preemptions == 0
    sizes = [len(out.scheduled_new_reqs) for out in result.steps if out.scheduled_new_reqs]
    assert sizes == [1, 1, 1]
    assert_steps_fit_shapes(result, (SMALL,))


def test_shape_rules():
    shapes = StaticBatching((SMALL, LONG, StaticShape(4, 8, 2)))
    assert shapes.shape_for(5, 2) == StaticShape(4, 8, 2)  # fewer new tokens, larger batch
    assert shapes.shape_for(5, 3) == SMALL
    assert shapes.shape_for(9, 1) == LONG
    assert shapes.shape_for(25, 1) is None
    with pytest.raises(ValueError, match="batch_size"):
        StaticShape(0, 8, 2)
    with pytest.raises(ValueError, match="at least one shape"):
        StaticBatching(())
