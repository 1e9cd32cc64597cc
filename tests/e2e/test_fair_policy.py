"""The fair policy on the real engine (SmolLM2): a light user's requests, sent behind a
heavy user's ten times as many, are scheduled among the first under "fair" and last under
"fcfs". (The TTFT bound itself is measured in steps in tests/scheduler/test_scheduler_fair.py.)"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

HEAVY, LIGHT = 20, 2


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_light_user_is_not_queued_behind_the_heavy_one_under_fair(smollm2, policy):
    llm = LLM(model=smollm2, scheduling_policy=policy, max_num_seqs=4, kv_cache_memory="64m",
              max_model_len=256)
    prompts = [f"Heavy request number {i}:" for i in range(HEAVY)] + \
              [f"Light request number {j}:" for j in range(LIGHT)]
    users = ["heavy"] * HEAVY + ["light"] * LIGHT
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4,
                                                ignore_eos=True),
                        use_tqdm=False, user=users)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    order = sorted(range(len(outs)), key=lambda i: (outs[i].metrics.first_scheduled_time, i))
    light_ranks = sorted(order.index(HEAVY + j) for j in range(LIGHT))
    if policy == "fair":
        assert light_ranks[-1] < 4, light_ranks  # both in the first batch of four
    else:
        assert light_ranks[0] >= HEAVY, light_ranks  # behind every heavy request


def test_user_must_match_the_prompts(smollm2):
    llm = LLM(model=smollm2, kv_cache_memory="64m", max_model_len=128)
    with pytest.raises(ValueError, match="user has 1 entries but there are 2 prompts"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False, user=["x"])
