"""Data parallelism on CPU: two engine-core processes behind one client give the same greedy
tokens as one engine, both cores do work, an abort reaches the core that owns the request,
and the balancing/stats-merging rules hold."""

from __future__ import annotations

import time

import pytest

from engine.engine_core.dp import LoadBalancer, StatsMerger, combine_utility_results
from engine.messages.core import EngineCoreRequest, SchedulerStats
from engine.sampling_params import SamplingParams
from tests.distributed.conftest import PROMPTS, assert_same_generation

BATCH = PROMPTS + [[5, 6, 7, 8, 9], [300, 301, 302], [42] * 20]


def test_balancer_picks_fewest_unfinished_ties_by_index_and_routes_aborts():
    lb = LoadBalancer(3)
    assert [lb.assign(r) for r in "abc"] == [0, 1, 2]
    assert lb.assign("d") == 0  # all tied at one: lowest index
    lb.finish("b")
    assert lb.assign("e") == 1  # core 1 has fewest now
    assert lb.num_unfinished == [2, 1, 1]
    with pytest.raises(ValueError, match="already running"):
        lb.assign("a")
    assert lb.route_aborts(["a", "c", "zzz", "d"]) == {0: ["a", "d"], 2: ["c"]}
    assert lb.num_unfinished == [0, 1, 0]
    assert lb.finish("a") is None  # aborted requests are forgotten
    assert lb.assign("f") == 0


def test_stats_merge_sums_gauges_and_passes_each_delta_once():
    merger = StatsMerger(2)
    first = merger.merge(0, SchedulerStats(num_running_reqs=3, num_waiting_reqs=1,
                                           kv_cache_usage=0.5, num_generation_tokens=3))
    assert (first.num_running_reqs, first.kv_cache_usage, first.num_generation_tokens) == \
        (3, 0.25, 3)
    second = merger.merge(1, SchedulerStats(num_running_reqs=2, kv_cache_usage=0.3,
                                            num_generation_tokens=2, num_prompt_tokens=7))
    assert (second.num_running_reqs, second.num_waiting_reqs) == (5, 1)
    assert second.kv_cache_usage == pytest.approx(0.4)
    assert (second.num_generation_tokens, second.num_prompt_tokens) == (2, 7)
    third = merger.merge(0, SchedulerStats())  # core 0 drained
    assert (third.num_running_reqs, third.num_generation_tokens) == (2, 0)
    # The expert load is a delta like the counters: the reporting core's, summed later.
    assert merger.merge(1, SchedulerStats(expert_load=[2, 5])).expert_load == [2, 5]
    assert merger.merge(0, SchedulerStats()).expert_load is None


def test_utility_results_combine():
    assert combine_utility_results([True, True]) is True
    assert combine_utility_results([True, False]) is False
    assert combine_utility_results(["pong", "pong"]) == "pong"
    assert combine_utility_results([1, 2]) == [1, 2]


def _generate(model: str, dp: int, **kwargs):
    from engine.entrypoints.llm import LLM

    llm = LLM(model, data_parallel_size=dp, num_kv_blocks=64, max_model_len=256,
              max_num_seqs=8, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in BATCH],
                            SamplingParams(temperature=0.0, max_tokens=8, logprobs=3),
                            use_tqdm=False)
        per_core = list(llm.client.replicas.num_generation_tokens) if dp > 1 else None
        pids = [c.pid for c in llm.client.clients] if dp > 1 else None
        metrics = llm.get_metrics()
        assert llm.reset_prefix_cache() is True
    finally:
        llm.shutdown()
    result = ([list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].logprobs for o in outs])
    return result, per_core, pids, metrics


def test_dp2_equals_dp1_and_both_cores_work(tiny_llama_kv1):
    single, _, _, _ = _generate(tiny_llama_kv1, 1)
    split, per_core, pids, metrics = _generate(tiny_llama_kv1, 2)
    assert_same_generation(single, split)
    # Six prompts alternate between the two cores: each samples 3 x 8 tokens.
    assert per_core == [24, 24]
    assert len(set(pids)) == 2
    assert metrics["num_generation_tokens"] == 48


def test_dp2_by_pp2_equals_dp1(tiny_llama_kv1):
    """Two replicas, each a two-stage pipeline (two mp workers per core): the replicas take
    different ranks' worth of devices and rendezvous separately; same tokens as one core."""
    single, _, _, _ = _generate(tiny_llama_kv1, 1)
    split, per_core, pids, _ = _generate(tiny_llama_kv1, 2, pipeline_parallel_size=2)
    assert_same_generation(single, split)
    assert per_core == [24, 24] and len(set(pids)) == 2


def test_abort_reaches_the_owning_core(tiny_llama_kv1):
    from engine.engine_args import EngineArgs
    from engine.engine_core.dp import DPSyncClient

    config = EngineArgs(model=tiny_llama_kv1, data_parallel_size=2, num_kv_blocks=64,
                        max_model_len=256, load_format="dummy").create_config()
    client = DPSyncClient(config)
    try:
        client.wait_until_ready(timeout_s=300)
        short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        for rid in "abcd":
            client.add_request(EngineCoreRequest(
                rid, [1, 2, 3, 4], long if rid == "b" else short, None, time.time()))
        assert client.replicas.balancer.owner == {"a": 0, "b": 1, "c": 0, "d": 1}
        tokens = dict.fromkeys("abcd", 0)
        finished: set[str] = set()
        aborted = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            outputs = client.get_output()
            for out in outputs.outputs:
                tokens[out.request_id] += len(out.new_token_ids)
                if out.finished:
                    finished.add(out.request_id)
            if not aborted and tokens["b"] > 0:
                client.abort_requests(["b"])
                aborted = True
                assert client.num_unfinished[1] <= 1  # b no longer counts on core 1
            stats = outputs.scheduler_stats
            if finished >= {"a", "c", "d"} and aborted and stats is not None \
                    and stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0:
                break
        else:
            pytest.fail(f"engine did not drain: tokens {tokens}, finished {finished}")
        # A misrouted abort would have left b running on core 1 until its 200 tokens.
        assert "b" not in finished and 0 < tokens["b"] < 200
        assert tokens["a"] == tokens["c"] == tokens["d"] == 4
        assert client.num_unfinished == [0, 0]
    finally:
        client.shutdown()
