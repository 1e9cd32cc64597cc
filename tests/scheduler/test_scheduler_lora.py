"""The scheduler with LoRA: at most max_loras distinct adapters run at once, a request whose
adapter would be one too many is skipped (vLLM V1) and nothing starves, and prefix-cache
hits stay within one adapter."""

from __future__ import annotations

from typing import Optional

import pytest

from engine.messages.core import LoRARequest
from engine.sampling_params import SamplingParams
from engine.scheduler.request import Request
from tests.scheduler.scheduler_fakes import FakeRunner, make_scheduler, run_to_completion


def lora(lora_id: int) -> LoRARequest:
    return LoRARequest(f"adapter{lora_id}", lora_id, f"/adapters/{lora_id}")


def lora_request(req_id: str, prompt: list[int], lora_id: Optional[int], arrival: float = 0.0,
                 max_tokens: int = 4) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_time=arrival,
                   lora_request=None if lora_id is None else lora(lora_id))


def lora_scheduler(max_loras: Optional[int], **kwargs):
    scheduler = make_scheduler(**kwargs)
    scheduler.max_loras = max_loras
    return scheduler


def step_loras(out, lora_of: dict[str, Optional[int]]) -> set[int]:
    return {lora_of[r] for r in out.num_scheduled_tokens if lora_of[r] is not None}


@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_no_step_runs_more_than_max_loras_and_nothing_starves(policy):
    scheduler = lora_scheduler(2, num_blocks=256, max_num_seqs=8, max_num_batched_tokens=64,
                               policy=policy)
    lora_of: dict[str, Optional[int]] = {}
    # Adapters 1..4 and the base model interleaved, lengths and output lengths varied.
    for i in range(16):
        lora_id = None if i % 5 == 4 else 1 + i % 4
        req_id = f"r{i}"
        lora_of[req_id] = lora_id
        scheduler.add_request(lora_request(req_id, [100 + i] * (3 + i % 7), lora_id,
                                           arrival=float(i), max_tokens=2 + i % 5))
    result = run_to_completion(scheduler, FakeRunner(256, 4))
    assert set(result.finished) == set(lora_of)  # every request finished: none starved
    for out in result.steps:
        assert len(step_loras(out, lora_of)) <= 2
    # Every adapter got its turn while others were waiting (the limit was reached).
    assert max(len(step_loras(out, lora_of)) for out in result.steps) == 2
    assert {x for out in result.steps for x in step_loras(out, lora_of)} == {1, 2, 3, 4}


def test_a_request_for_one_adapter_too_many_is_skipped_not_blocking():
    """vLLM V1: the third adapter's request waits, the ones behind it (a running adapter,
    the base model) are admitted this same step; it keeps its place at the front."""
    scheduler = lora_scheduler(2, max_num_seqs=8, max_num_batched_tokens=64)
    for i, lora_id in enumerate([1, 2, 3, 1, None]):
        scheduler.add_request(lora_request(f"r{i}", [10 + i] * 4, lora_id, arrival=float(i)))
    out = scheduler.schedule()
    assert [r.req_id for r in out.scheduled_new_reqs] == ["r0", "r1", "r3", "r4"]
    assert [r.request_id for r in scheduler.waiting] == ["r2"]
    # The new-request data carries each adapter to the worker.
    by_id = {r.req_id: r.lora_request for r in out.scheduled_new_reqs}
    assert by_id["r0"] == lora(1) and by_id["r3"] == lora(1) and by_id["r4"] is None


def test_skipped_request_goes_once_an_adapter_is_free():
    scheduler = lora_scheduler(1, max_num_seqs=8, max_num_batched_tokens=64)
    scheduler.add_request(lora_request("a", [1, 2, 3, 4], 1, arrival=0.0, max_tokens=3))
    scheduler.add_request(lora_request("b", [5, 6, 7, 8], 2, arrival=1.0, max_tokens=3))
    scheduler.add_request(lora_request("c", [9, 9, 9, 9], 1, arrival=2.0, max_tokens=3))
    result = run_to_completion(scheduler, FakeRunner(64, 4))
    lora_of = {"a": 1, "b": 2, "c": 1}
    first_step = {r: i for i, out in reversed(list(enumerate(result.steps)))
                  for r in out.num_scheduled_tokens}
    assert first_step["a"] == first_step["c"] == 0  # c skips ahead of b: same adapter as a
    assert first_step["b"] > 0
    for out in result.steps:
        assert len(step_loras(out, lora_of)) <= 1
    assert set(result.finished) == {"a", "b", "c"}


def test_running_requests_keep_their_adapters_after_preemption_pressure():
    """Few blocks force preemptions; the running set still never exceeds max_loras."""
    scheduler = lora_scheduler(2, num_blocks=12, block_size=4, max_num_seqs=8,
                               max_num_batched_tokens=32)
    lora_of = {}
    for i in range(8):
        lora_of[f"r{i}"] = 1 + i % 3
        scheduler.add_request(lora_request(f"r{i}", [20 + i] * 6, 1 + i % 3, arrival=float(i),
                                           max_tokens=8))
    runner = FakeRunner(12, 4)
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        assert len({r.lora_int_id for r in scheduler.running}) <= 2
        assert len(step_loras(out, lora_of)) <= 2
        scheduler.update_from_output(out, runner.execute(out))
    assert not scheduler.requests


def test_prefix_cache_hits_only_within_the_same_adapter():
    scheduler = lora_scheduler(4, num_blocks=64, max_num_batched_tokens=64)
    runner = FakeRunner(64, 4)
    prompt = list(range(30, 46))  # 4 full blocks

    def cached_tokens(req_id: str, lora_id: Optional[int]) -> int:
        scheduler.add_request(lora_request(req_id, prompt, lora_id, max_tokens=1))
        result = run_to_completion(scheduler, runner)
        return result.finished[req_id].num_cached_tokens

    assert cached_tokens("base", None) == 0
    assert cached_tokens("lora1", 1) == 0  # the base model's blocks are not adapter 1's
    assert cached_tokens("lora2", 2) == 0  # nor adapter 1's adapter 2's
    assert cached_tokens("lora1-again", 1) > 0
    assert cached_tokens("lora2-again", 2) > 0
    assert cached_tokens("base-again", None) > 0


def test_lora_request_with_lora_off_is_refused():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="--enable-lora"):
        scheduler.add_request(lora_request("r", [1, 2, 3], 1))


def test_from_engine_core_request_carries_the_adapter_into_the_cache_keys():
    from engine.messages.core import EngineCoreRequest

    core_request = EngineCoreRequest("r", [1, 2, 3], SamplingParams(), None, 0.0,
                                     lora_request=lora(3))
    request = Request.from_engine_core_request(core_request)
    assert request.lora_request == lora(3)
    assert request.lora_int_id == 3
    assert ("lora", 3) in request.extra_keys
    assert Request.from_engine_core_request(
        EngineCoreRequest("s", [1], SamplingParams(), None, 0.0)).extra_keys == ()
