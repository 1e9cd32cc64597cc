"""The fair policy: with two users, one sending 10x the requests, the light user's mean TTFT
stays within 2x of its TTFT alone, where FCFS lets it grow more than 5x (steps of the real
scheduler with the fake runner; time is counted in steps)."""

from __future__ import annotations

import pytest
from scheduler_fakes import FakeRunner, make_scheduler

from engine.sampling_params import SamplingParams
from engine.scheduler.policy import (
    BUILTIN_POLICIES,
    FairQueue,
    available_policies,
    create_waiting_queue,
)
from engine.scheduler.request import Request

LIGHT = 10  # light-user requests, one every 6 steps; the heavy user sends 10x as many


def _arrivals(heavy: bool) -> list[tuple[int, Request]]:
    arrivals = []
    if heavy:  # a burst of ten requests per step, from step 0
        for i in range(10 * LIGHT):
            params = SamplingParams(max_tokens=8 + i % 9, ignore_eos=True)
            arrivals.append((i // 10, Request(f"h{i}", [1 + i % 7] * 64, params,
                                              arrival_time=i // 10 + i * 1e-4, tenant="heavy")))
    for j in range(LIGHT):
        step = 3 + 6 * j
        arrivals.append((step, Request(f"l{j}", [100 + j] * 96,
                                       SamplingParams(max_tokens=8, ignore_eos=True),
                                       arrival_time=step, tenant="light")))
    return sorted(arrivals, key=lambda a: (a[0], a[1].arrival_time))


def light_mean_ttft(policy: str, heavy: bool) -> float:
    """Mean steps from arrival to first token of the light user's requests."""
    scheduler = make_scheduler(num_blocks=4096, block_size=4, max_num_seqs=16,
                               max_num_batched_tokens=64, max_model_len=512, policy=policy)
    runner = FakeRunner(4096, 4)
    arrivals = _arrivals(heavy)
    arrived: dict[str, int] = {}
    first: dict[str, int] = {}
    step = k = 0
    while k < len(arrivals) or scheduler.has_unfinished_requests():
        while k < len(arrivals) and arrivals[k][0] <= step:
            request = arrivals[k][1]
            arrived[request.request_id] = step
            scheduler.add_request(request)
            k += 1
        out = scheduler.schedule()
        for output in scheduler.update_from_output(out, runner.execute(out)).outputs:
            if output.new_token_ids:
                first.setdefault(output.request_id, step + 1)
        step += 1
        assert step < 10_000
    assert scheduler.kv_cache.num_free_blocks == 4096
    light = [first[r] - arrived[r] for r in arrived if r.startswith("l")]
    return sum(light) / len(light)


def test_fair_keeps_the_light_user_near_its_ttft_alone_where_fcfs_does_not():
    alone = light_mean_ttft("fcfs", heavy=False)
    assert light_mean_ttft("fair", heavy=False) == alone  # one user: fair is FCFS
    fcfs = light_mean_ttft("fcfs", heavy=True) / alone
    fair = light_mean_ttft("fair", heavy=True) / alone
    print(f"light-user TTFT vs alone: fcfs {fcfs:.1f}x, fair {fair:.1f}x")
    assert fcfs >= 5.0
    assert fair <= 2.0


def _req(name: str, tenant, arrival: float) -> Request:
    return Request(name, [1, 2], SamplingParams(), arrival_time=arrival, tenant=tenant)


def test_fair_order_by_tokens_served_and_newcomers_start_at_the_floor():
    queue = FairQueue()
    a1, a2, b1 = _req("a1", "a", 0.0), _req("a2", "a", 1.0), _req("b1", "b", 2.0)
    for r in (a1, a2, b1):
        queue.add(r)
    assert [r.request_id for r in queue] == ["a1", "a2", "b1"]  # tie: earlier arrival
    queue.on_scheduled(a1, 100)
    assert queue.peek() is b1 and len(queue) == 3
    assert queue.pop() is b1
    queue.on_scheduled(b1, 30)
    # b is served 30 and waits for nothing; a newcomer c starts at the waiting floor (a: 100),
    # not at 0, so it cannot hold a off for 100 tokens' worth of steps.
    c1 = _req("c1", "c", 3.0)
    queue.add(c1)
    assert queue._served["c"] == 100
    # a (served 100, head arrived 0.0) before c (served 100, arrived 3.0).
    assert [queue.pop() for _ in range(3)] == [a1, a2, c1] and len(queue) == 0
    assert queue.select_victim([a1, b1]) is a1  # the most-served tenant's request


def test_policies_come_from_the_entry_point_group_and_unknown_names_are_refused():
    names = set(available_policies())
    assert {"fcfs", "priority", "fair"} <= names
    for name, cls in BUILTIN_POLICIES.items():
        assert type(create_waiting_queue(name)) is cls
    with pytest.raises(ValueError, match="Unknown scheduling policy 'nope'.*engine.schedulers"):
        create_waiting_queue("nope")
