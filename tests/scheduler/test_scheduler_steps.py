"""The one scheduling rule: chunking, mixing, budgets, max_num_seqs, new data vs deltas."""

import pytest
from scheduler_fakes import FakeRunner, make_request, make_scheduler, run_to_completion


def test_chunked_prefill_splits_long_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(64, 4)
    scheduler.add_request(make_request("a", list(range(50)), max_tokens=3))
    result = run_to_completion(scheduler, runner)
    counts = [out.num_scheduled_tokens.get("a", 0) for out in result.steps]
    assert counts == [16, 16, 16, 2, 1, 1]
    assert len(result.tokens["a"]) == 3
    # New data exactly once, then only deltas with the right computed count.
    assert [len(out.scheduled_new_reqs) for out in result.steps] == [1, 0, 0, 0, 0, 0]
    computed = [c.num_computed_tokens for out in result.steps[1:]
                for c in out.scheduled_cached_reqs]
    assert computed == [16, 32, 48, 50, 51]


def test_no_sample_output_mid_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(64, 4)
    scheduler.add_request(make_request("a", list(range(20))))
    out = scheduler.schedule()
    result = scheduler.update_from_output(out, runner.execute(out))
    assert result.outputs == []  # nothing sampled, nothing finished
    assert result.scheduler_stats.num_prompt_tokens == 8
    assert result.scheduler_stats.num_generation_tokens == 0


def test_decode_and_prefill_in_one_step():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    runner = FakeRunner(64, 4)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    out = scheduler.schedule()
    scheduler.update_from_output(out, runner.execute(out))
    scheduler.add_request(make_request("b", list(range(100, 130)), arrival=1.0))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    assert [c.req_id for c in out.scheduled_cached_reqs] == ["a"]
    assert [n.req_id for n in out.scheduled_new_reqs] == ["b"]


def test_max_num_seqs_and_budget_every_step():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=12)
    runner = FakeRunner(64, 4)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", list(range(i, i + 9)), arrival=i,
                                           max_tokens=4))
    result = run_to_completion(scheduler, runner)  # asserts the limits every step
    assert max(len(out.num_scheduled_tokens) for out in result.steps) == 2
    assert all(len(result.tokens[f"r{i}"]) == 4 for i in range(5))
    # FCFS: r0 and r1 finish before r4 even starts.
    first_step = {rid: next(i for i, out in enumerate(result.steps)
                            if rid in out.num_scheduled_tokens) for rid in result.tokens}
    assert first_step["r0"] == first_step["r1"] == 0 < first_step["r2"] <= first_step["r4"]


def test_chunking_disabled_waits_for_room():
    scheduler = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    runner = FakeRunner(64, 4)
    scheduler.add_request(make_request("a", list(range(6)), max_tokens=4))
    scheduler.add_request(make_request("b", list(range(50, 59)), arrival=1.0, max_tokens=2))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 6}  # b (9 tokens) does not fit the 4 left
    scheduler.update_from_output(out, runner.execute(out))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        scheduler.add_request(make_request("c", list(range(11))))


def test_outputs_match_between_batched_and_solo_runs():
    prompts = {f"r{i}": [i + 1] * (3 + 5 * i) for i in range(4)}
    solo = {}
    for rid, prompt in prompts.items():
        scheduler = make_scheduler()
        scheduler.add_request(make_request(rid, prompt, max_tokens=7))
        solo[rid] = run_to_completion(scheduler, FakeRunner(64, 4)).tokens[rid]
    scheduler = make_scheduler(max_num_batched_tokens=9)
    for i, (rid, prompt) in enumerate(prompts.items()):
        scheduler.add_request(make_request(rid, prompt, arrival=i, max_tokens=7))
    assert run_to_completion(scheduler, FakeRunner(64, 4)).tokens == solo


def test_add_request_rejects_what_can_never_fit():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len=64"):
        scheduler.add_request(make_request("long", list(range(65))))
    with pytest.raises(ValueError, match="only 4 exist"):
        scheduler.add_request(make_request("big", list(range(17))))
    scheduler.add_request(make_request("ok", list(range(16))))
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("ok", [1]))
    assert scheduler.get_num_unfinished_requests() == 1
