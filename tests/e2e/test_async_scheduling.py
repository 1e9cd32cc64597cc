"""Async scheduling on the real SmolLM2 model: step N+1 is scheduled and launched before step
N's tokens reach the host, decodes read them on the device, and every output equals
one-step-at-a-time scheduling: greedy, seeded, penalties, min_tokens, logprobs, stop ids,
preemption, and an abort in the middle."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,",
           "Write a poem about the sea:", "Once upon a time", "def fibonacci(n):"]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=24),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=11),
        SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3,
                       frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=12, logprobs=3),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=30, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[28, 30]),
    ]


def _run(llm: LLM) -> list[tuple]:
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    result = []
    for out in outs:
        c = out.outputs[0]
        logprobs = None if c.logprobs is None else [
            sorted(entry)[:2] for entry in c.logprobs]
        result.append((c.token_ids, c.finish_reason, logprobs))
    return result


@pytest.fixture(scope="module")
def sync_outputs(smollm2):
    llm = LLM(model=smollm2, max_num_batched_tokens=32, async_scheduling=False)
    assert not llm.core.async_scheduling
    return _run(llm)


def test_cpu_default_is_one_step_at_a_time(smollm2):
    llm = LLM(model=smollm2, num_kv_blocks=16)
    assert not llm.core.async_scheduling  # the CPU runs synchronously: nothing to overlap


def test_async_outputs_equal_sync(smollm2, sync_outputs):
    llm = LLM(model=smollm2, max_num_batched_tokens=32, async_scheduling=True)
    assert llm.core.async_scheduling
    assert _run(llm) == sync_outputs
    queue = llm.core.batch_queue
    assert queue is not None and queue.num_overlapped > 20  # really overlapped
    assert llm.core.scheduler.kv_cache.num_free_blocks == llm.core.num_blocks
    assert not llm.core.scheduler._in_flight


def test_async_with_preemption_and_abort(smollm2):
    params = SamplingParams(temperature=1.0, max_tokens=50, seed=3, ignore_eos=True)
    prompts = [f"Tell me about topic {i}." for i in range(4)]
    expected = [o.outputs[0].token_ids for o in LLM(
        model=smollm2, num_kv_blocks=64, async_scheduling=False).generate(
            prompts, params, use_tqdm=False)]
    small = LLM(model=smollm2, num_kv_blocks=10, max_num_batched_tokens=64,
                enable_prefix_caching=False, async_scheduling=True)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.get_metrics()["num_preemptions"] > 0
    assert got == expected
    assert small.core.scheduler.kv_cache.num_free_blocks == 10

    # Abort one request while its batch and the next are in flight; the others finish.
    core = small.core
    from engine.messages.core import EngineCoreRequest
    for i, prompt in enumerate(prompts[:2]):
        core.add_request(EngineCoreRequest(
            request_id=f"a{i}", prompt_token_ids=small.tokenizer.encode(prompt),
            sampling_params=params, eos_token_id=None, arrival_time=0.0))
    for _ in range(4):
        core.step()
    assert core.scheduler._in_flight["a0"] >= 1
    core.abort_requests(["a0"])
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert "a0" not in tokens or len(tokens["a0"]) < 50
    assert core.scheduler.kv_cache.num_free_blocks == 10
    assert not core.scheduler._in_flight


def test_async_refused_with_pipeline_parallelism(smollm2):
    with pytest.raises(ValueError, match="async-scheduling is not possible"):
        LLM(model=smollm2, pipeline_parallel_size=2, async_scheduling=True, num_kv_blocks=16)
