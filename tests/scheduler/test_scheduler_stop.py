"""Stop checks in order: stop token ids, EOS (ignore_eos, min_tokens), max_tokens, length."""

from scheduler_fakes import (
    FakeRunner,
    counting_next_token,
    make_request,
    make_scheduler,
    run_to_completion,
)

from engine.messages.core import FinishReason


def run_one(prompt, max_model_len=256, eos=None, **params):
    scheduler = make_scheduler(max_model_len=max_model_len)
    scheduler.add_request(make_request("a", prompt, eos=eos, **params))
    result = run_to_completion(scheduler, FakeRunner(64, 4, next_token=counting_next_token))
    assert scheduler.kv_cache.num_free_blocks == 64
    return result.tokens["a"], result.finished["a"]


def test_eos_stops_and_is_returned():
    tokens, out = run_one([1, 2, 3], eos=6, max_tokens=10)
    assert tokens == [4, 5, 6]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    tokens, out = run_one([1, 2, 3], eos=6, max_tokens=5, ignore_eos=True)
    assert tokens == [4, 5, 6, 7, 8]
    assert out.finish_reason == FinishReason.LENGTH


def test_stop_token_id_sets_stop_reason():
    tokens, out = run_one([1, 2, 3], eos=9, max_tokens=10, stop_token_ids=[5, 8])
    assert tokens == [4, 5]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == 5


def test_min_tokens_suppresses_eos_and_stop_ids():
    tokens, out = run_one([1, 2, 3], eos=5, max_tokens=10, min_tokens=4,
                          stop_token_ids=[4, 8])
    assert tokens == [4, 5, 6, 7, 8]  # 4 and 5 come before min_tokens; 8 then stops
    assert out.stop_reason == 8


def test_eos_at_exactly_min_tokens_stops():
    tokens, out = run_one([1, 2, 3], eos=6, max_tokens=10, min_tokens=3)
    assert tokens == [4, 5, 6] and out.finish_reason == FinishReason.STOP


def test_max_tokens():
    tokens, out = run_one([1, 2, 3], max_tokens=4)
    assert tokens == [4, 5, 6, 7] and out.finish_reason == FinishReason.LENGTH


def test_max_model_len_ends_request():
    tokens, out = run_one([1, 2, 3], max_model_len=7, max_tokens=None)
    assert tokens == [4, 5, 6, 7]  # prompt 3 + 4 outputs = max_model_len
    assert out.finish_reason == FinishReason.LENGTH


def test_stats_count_prompt_and_generation_tokens():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", list(range(10)), max_tokens=3))
    runner = FakeRunner(64, 4)
    totals = {"prompt": 0, "gen": 0}
    usage_seen = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        stats = scheduler.update_from_output(out, runner.execute(out)).scheduler_stats
        totals["prompt"] += stats.num_prompt_tokens
        totals["gen"] += stats.num_generation_tokens
        usage_seen.append(stats.kv_cache_usage)
    assert totals == {"prompt": 10, "gen": 3}
    assert usage_seen[0] > 0.0 and usage_seen[-1] == 0.0


def test_request_outgrowing_the_whole_cache_ends_as_length():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=20))
    result = run_to_completion(scheduler, FakeRunner(2, 4, next_token=counting_next_token))
    # 3 prompt + 6 outputs = 9 tokens: computing the 9th needs a third block.
    assert result.tokens["a"] == [4, 5, 6, 7, 8, 9]
    assert result.finished["a"].finish_reason == FinishReason.LENGTH
    assert scheduler.kv_cache.num_free_blocks == 2
