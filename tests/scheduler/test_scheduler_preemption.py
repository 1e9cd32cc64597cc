"""Preemption by recompute, policies (order and victim), abort, prefix hits across requests."""

import pytest
from scheduler_fakes import FakeRunner, make_request, make_scheduler, run_to_completion

from engine.scheduler.policy import FCFSQueue, PriorityQueue, create_waiting_queue
from engine.scheduler.request import RequestStatus


def _prompts():
    return {f"r{i}": [(7 * i + j) % 50 for j in range(6 + 3 * i)] for i in range(5)}


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_then_resume_gives_identical_outputs(caching):
    def run(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=4,
                                   max_num_batched_tokens=16, enable_prefix_caching=caching)
        for i, (rid, prompt) in enumerate(_prompts().items()):
            scheduler.add_request(make_request(rid, prompt, arrival=i, max_tokens=12))
        result = run_to_completion(scheduler, FakeRunner(num_blocks, 4))
        assert scheduler.kv_cache.num_free_blocks == num_blocks  # nothing leaked
        return result

    roomy, tight = run(200), run(12)
    assert roomy.num_preemptions == 0
    assert tight.num_preemptions > 0
    assert any(out.preempted_req_ids for out in tight.steps)
    assert tight.tokens == roomy.tokens
    assert all(len(tokens) == 12 for tokens in tight.tokens.values())


def test_preempted_request_resent_with_its_outputs():
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=32)
    runner = FakeRunner(6, 4)
    scheduler.add_request(make_request("old", list(range(8)), arrival=0, max_tokens=20))
    scheduler.add_request(make_request("new", list(range(50, 58)), arrival=1, max_tokens=20))
    preempted_step = None
    for _ in range(30):
        out = scheduler.schedule()
        if out.preempted_req_ids:
            preempted_step = out
            break
        scheduler.update_from_output(out, runner.execute(out))
    assert preempted_step is not None
    assert preempted_step.preempted_req_ids == {"new"}  # FCFS victim: the latest arrival
    victim = scheduler.requests["new"]
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert victim.num_preemptions == 1
    scheduler.update_from_output(preempted_step, runner.execute(preempted_step))
    resent = None
    while resent is None:
        out = scheduler.schedule()
        resent = next((n for n in out.scheduled_new_reqs if n.req_id == "new"), None)
        scheduler.update_from_output(out, runner.execute(out))
    assert resent.output_token_ids == victim.output_token_ids[: len(resent.output_token_ids)]
    assert len(resent.output_token_ids) > 0


def test_priority_victim_is_worst_priority():
    scheduler = make_scheduler(num_blocks=6, block_size=4, policy="priority")
    runner = FakeRunner(6, 4)
    scheduler.add_request(make_request("vip", list(range(8)), arrival=1, priority=0,
                                       max_tokens=20))
    scheduler.add_request(make_request("low", list(range(50, 58)), arrival=0, priority=5,
                                       max_tokens=20))
    for _ in range(30):
        out = scheduler.schedule()
        if out.preempted_req_ids:
            assert out.preempted_req_ids == {"low"}  # earlier arrival, worse priority
            return
        scheduler.update_from_output(out, runner.execute(out))
    pytest.fail("no preemption happened")


def test_priority_orders_waiting_queue():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    for rid, arrival, priority in [("a", 0, 3), ("b", 1, 1), ("c", 2, 1), ("d", 3, 0)]:
        scheduler.add_request(make_request(rid, [1, 2, 3], arrival=arrival, priority=priority,
                                           max_tokens=1))
    result = run_to_completion(scheduler, FakeRunner(64, 4))
    order = [n.req_id for out in result.steps for n in out.scheduled_new_reqs]
    assert order == ["d", "b", "c", "a"]


def test_fcfs_orders_by_arrival_without_skipping():
    queue = create_waiting_queue("fcfs")
    reqs = [make_request(r, [1], arrival=t, priority=p)
            for r, t, p in [("a", 0, 9), ("b", 1, 0), ("c", 2, 5)]]
    for req in reqs:
        queue.add(req)
    assert [r.request_id for r in queue] == ["a", "b", "c"]
    assert queue.select_victim(reqs).request_id == "c"
    queue.prepend(make_request("p", [1], arrival=5))
    assert queue.peek().request_id == "p"
    assert isinstance(queue, FCFSQueue)


def test_priority_queue_order_victim_and_remove():
    queue = create_waiting_queue("priority")
    reqs = [make_request(r, [1], arrival=t, priority=p)
            for r, t, p in [("a", 0, 9), ("b", 1, 0), ("c", 2, 0), ("d", 3, 9)]]
    for req in reqs:
        queue.add(req)
    assert isinstance(queue, PriorityQueue)
    assert [r.request_id for r in queue] == ["b", "c", "a", "d"]
    assert queue.select_victim(reqs).request_id == "d"
    queue.remove([reqs[1]])
    assert queue.pop().request_id == "c" and len(queue) == 2
    with pytest.raises(ValueError, match="scheduling-policy"):
        create_waiting_queue("lottery")


def test_abort_frees_blocks_and_is_reported():
    scheduler = make_scheduler(num_blocks=32, max_num_seqs=1)
    runner = FakeRunner(32, 4)
    scheduler.add_request(make_request("run", list(range(10)), max_tokens=50))
    scheduler.add_request(make_request("wait", list(range(20, 30)), arrival=1))
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    assert scheduler.kv_cache.num_free_blocks < 32
    scheduler.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache.num_free_blocks == 32
    assert not scheduler.has_unfinished_requests()
    assert len(scheduler.waiting) == 0 and scheduler.running == []
    out = scheduler.schedule()
    assert out.finished_req_ids == {"run", "wait"} and out.is_empty
    assert scheduler.schedule().finished_req_ids == set()  # reported once
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_requests("x", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_skipped():
    scheduler = make_scheduler()
    runner = FakeRunner(64, 4)
    scheduler.add_request(make_request("a", [1, 2, 3]))
    scheduler.add_request(make_request("b", [4, 5, 6]))
    out = scheduler.schedule()
    runner_out = runner.execute(out)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    result = scheduler.update_from_output(out, runner_out)
    assert [o.request_id for o in result.outputs] == ["b"]
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_prefix_hits_across_two_requests():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    runner = FakeRunner(64, 4)
    shared = list(range(30, 50))  # 20 tokens = 5 blocks
    scheduler.add_request(make_request("a", shared + [1, 2], max_tokens=2))
    first = run_to_completion(scheduler, runner)
    assert first.finished["a"].num_cached_tokens == 0
    scheduler.add_request(make_request("b", shared + [3, 4, 5], max_tokens=2))
    out = scheduler.schedule()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 20 and out.num_scheduled_tokens == {"b": 3}
    result = scheduler.update_from_output(out, runner.execute(out))
    assert result.scheduler_stats.prefix_cache_queries == 23
    assert result.scheduler_stats.prefix_cache_hits == 20
    assert result.outputs[0].num_cached_tokens == 20
    # The hit KV (written by "a") gives the same answer as computing from scratch.
    rest = run_to_completion(scheduler, runner)
    cold = make_scheduler(enable_prefix_caching=False)
    cold.add_request(make_request("b", shared + [3, 4, 5], max_tokens=2))
    expected = run_to_completion(cold, FakeRunner(64, 4)).tokens["b"]
    assert result.outputs[0].new_token_ids + rest.tokens["b"] == expected
