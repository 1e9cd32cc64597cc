"""Sliding-window attention end to end: Mistral (every layer windowed) and Qwen2 with window
layers beside full ones (two KV-cache groups) give HF transformers' greedy tokens and
logprobs on random weights, with prompts longer than the window, batched, in chunks, with
prefix caching on and off, and in a KV cache too small to hold the prompts unwindowed; the
window groups keep only the blocks their window reaches."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, Qwen2Config

from engine import LLM, SamplingParams
from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer
from tests.models.hf_reference import hf_greedy
from tests.models.test_model_logits_vs_hf import save_random_model

VOCAB = 256
WINDOW = 12
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
CASES = {
    "mistral": lambda: MistralConfig(sliding_window=WINDOW, num_hidden_layers=2, **SMALL),
    # Qwen2 windows the layers from max_window_layers on: layers 0 full, 1 and 2 windowed.
    "qwen2-hybrid": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1, num_hidden_layers=3, **SMALL),
}
PROMPT_LENS = (45, 30, 61, 7)
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_random_model(CASES[request.param](), directory)
    save_word_level_tokenizer(str(directory), VOCAB)
    return directory, hf_model


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_tokens_and_logprobs_equal_hf_past_the_window(model_dir, prefix_caching):
    directory, hf_model = model_dir
    prompts = _prompts()
    # A shared prefix longer than the window: the second copy finds it in the cache.
    prompts.append(prompts[0][:40] + [1, 2, 3])
    llm = LLM(model=str(directory), dtype="float32", max_num_batched_tokens=16,
              max_num_seqs=3, block_size=4, enable_prefix_caching=prefix_caching,
              max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf_model, prompt, MAX_TOKENS)
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        got_lp = [entry[t].logprob for entry, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(logprobs),
                                   rtol=1e-4, atol=1e-4)


def test_a_tiny_kv_cache_preempts_and_still_equals_hf(model_dir):
    """40 blocks of 4 tokens. A window group needs at most cdiv(11 + 32, 4) + 1 = 12 blocks
    per request: Mistral's four requests fit at once, where without windows their 47 blocks
    would not; Qwen2's full group needs 18 for the longest alone, so its batch preempts."""
    directory, hf_model = model_dir
    prompts = _prompts()
    llm = LLM(model=str(directory), dtype="float32", max_num_batched_tokens=32,
              max_num_seqs=4, block_size=4, num_kv_blocks=40, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf_model, prompt, MAX_TOKENS)[0]
    hybrid = "qwen2" in directory.name
    assert (llm.get_metrics()["num_preemptions"] > 0) == hybrid
    assert llm.get_metrics()["kv_cache_usage"] == 0.0  # every block back
