"""The `LLM` API on the real SmolLM2 model: sampling, seeds, stops, logprobs, chat, errors."""

from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(model=smollm2, max_num_batched_tokens=256)


def test_generate_returns_text_and_metrics(llm):
    outs = llm.generate(["Hello, my name is", "The capital of France is"],
                        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=0),
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello, my name is", "The capital of France is"]
    for out in outs:
        completion = out.outputs[0]
        assert completion.text and len(completion.token_ids) <= 20
        assert completion.finish_reason in ("stop", "length")
        assert out.finished and out.metrics.first_token_time is not None


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_32(llm):
    target = SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=1234)
    alone = llm.generate(["Once upon a time"], target, use_tqdm=False)[0].outputs[0].token_ids
    prompts = ["Once upon a time"] + [f"Story number {i}:" for i in range(31)]
    params = [target] + [SamplingParams(temperature=1.0, max_tokens=8 + i % 9,
                                        seed=None if i % 2 else i) for i in range(31)]
    batched = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == batched
    other = llm.generate(["Once upon a time"], target.clone(seed=99), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_seeded_sampling_survives_preemption(smollm2):
    # 12 blocks of 16 tokens cannot hold four ~70-token requests at once: preemption happens.
    small = LLM(model=smollm2, num_kv_blocks=12, max_num_batched_tokens=64,
                enable_prefix_caching=False)
    params = SamplingParams(temperature=1.0, max_tokens=60, seed=7, ignore_eos=True)
    prompts = [f"Tell me about topic {i}." for i in range(4)]
    together = small.generate(prompts, params, use_tqdm=False)
    alone = [small.generate([p], params, use_tqdm=False)[0] for p in prompts]
    assert small.get_metrics()["num_preemptions"] > 0
    for a, b in zip(together, alone):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert small.core.scheduler.kv_cache.num_free_blocks == 12  # nothing leaked
    assert small.get_metrics()["kv_cache_usage"] == 0.0


def test_stop_string_is_cut_and_not_returned(llm):
    base = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20),
                        use_tqdm=False)[0].outputs[0].text
    assert " 6" in base, base
    out = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20,
                                                       stop=[" 6"]), use_tqdm=False)[0]
    assert out.outputs[0].text == base[: base.index(" 6")]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == " 6"
    kept = llm.generate(["1, 2, 3, 4,"], SamplingParams(temperature=0.0, max_tokens=20,
                        stop=[" 6"], include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == base[: base.index(" 6") + 2]


def test_n_greater_than_one_gives_distinct_completions(llm):
    out = llm.generate(["Write a word:"], SamplingParams(n=3, temperature=1.0, max_tokens=8,
                                                         seed=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs_match_hf_for_greedy_tokens(llm, hf_smollm2, smollm2_tokenizer):
    prompt = "The capital of France is"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), -1)
    n = len(out.prompt_token_ids)
    for i, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert len(entry) >= 3 and tok in entry
        assert math.isclose(entry[tok].logprob, ref[n - 1 + i, tok].item(), abs_tol=2e-3)
        assert entry[tok].rank == 1  # greedy picks the top token
    assert out.prompt_logprobs[0] is None
    for pos in range(1, n):
        tok = ids[pos]
        assert math.isclose(out.prompt_logprobs[pos][tok].logprob, ref[pos - 1, tok].item(),
                            abs_tol=2e-3)


def test_prompt_logprobs_of_a_cached_prompt_are_computed_again(llm):
    """A prompt in the prefix cache still gets every prompt logprob: a request that asks
    for them takes no cache hit (before, the second request's prompt_logprobs were None)."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    first, second = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert second.prompt_logprobs is not None and second.num_cached_tokens == 0
    assert len(second.prompt_logprobs) == len(first.prompt_logprobs) > 32
    for a, b in zip(first.prompt_logprobs[1:], second.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-4) for t in a)
    # Without prompt logprobs the same prompt is found in the cache.
    plain = llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.num_cached_tokens > 0


def test_chat_uses_the_model_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert "<|im_start|>assistant" in out.prompt
    assert "Paris" in out.outputs[0].text


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "empty"),
    ("hi " * 9000, SamplingParams(), "max_model_len|max-model-len"),
])
def test_bad_prompts_raise_clear_errors(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], params, use_tqdm=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_a_bad_prompt_leaves_the_engine_usable(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.core.has_unfinished_requests()
    out = llm.generate(["fine"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert out[0].finished


def test_unknown_path_and_architecture_errors(tmp_path):
    with pytest.raises(ValueError, match="not found|does not exist|No such"):
        LLM(model=str(tmp_path / "nope.gguf"))
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"],
                                                      "model_type": "llama"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(model=str(tmp_path))


def test_min_tokens_masks_eos_even_when_eos_is_favoured(llm):
    eos = llm.eos_token_id
    # A large bias makes EOS the greedy choice at every step; min_tokens must hold it off.
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6,
                            logit_bias={eos: 100.0})
    out = llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and eos not in out.token_ids[:6]
    assert out.token_ids[6] == eos and out.finish_reason == "stop"


def test_metrics_timestamps_are_wall_clock_and_ordered(llm):
    import time

    t0 = time.time()
    out = llm.generate(["Hi"], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    m = out.metrics
    assert t0 <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time
    assert m.first_token_time <= m.finished_time <= time.time()


def test_a_request_that_fails_in_the_engine_raises_after_the_others_finish(llm, monkeypatch):
    from engine.outputs.request_output import RequestFailedError

    # Take admission's vocabulary check away, so the bad ids reach the worker.
    monkeypatch.setattr(llm.input_processor, "process", lambda prompt, sp: (None, prompt, sp))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = [[1, 504, 3458], [1, 504, 10**6], [1, 282, 4649]]
    with pytest.raises(RequestFailedError, match="outside the vocabulary") as info:
        llm.generate(prompts, params, use_tqdm=False)
    outputs = info.value.outputs
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "error", "length"]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 0, 5]
    monkeypatch.undo()
    again = llm.generate([prompts[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == outputs[0].outputs[0].token_ids
