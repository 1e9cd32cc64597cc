"""Engines for tensor-parallel tests: a tiny random Llama saved as an HF directory (one KV
head, so TP=2 replicates it), and a runner that returns tokens and logprobs then shuts down."""

from __future__ import annotations

import pytest
import torch

from engine.entrypoints.llm import LLM
from engine.sampling_params import SamplingParams

PROMPTS = [[1, 17, 230, 5, 99, 4000, 12], [7, 7, 7, 300], list(range(100, 140))]


@pytest.fixture(scope="session")
def tiny_llama_kv1(tmp_path_factory, smollm2_tokenizer) -> str:
    """Random weights with a wide init (distinct logits, so greedy ties are unlikely)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama-kv1")
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return str(directory)


def run_engine(model: str, tp: int, prompts=PROMPTS, max_tokens: int = 8, sample: bool = False,
               **kwargs):
    """(token lists, top-5 logprob dicts per token) of greedy generation (then, with `sample`,
    the tokens of unseeded random sampling appended), engine shut down."""
    llm = LLM(model, tensor_parallel_size=tp, num_kv_blocks=64, max_model_len=256,
              max_num_seqs=8, **kwargs)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    try:
        outs = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   logprobs=5), use_tqdm=False)
        # Unseeded sampling draws from each rank's default generator: if ranks drew
        # differently they would feed different tokens to the next step (garbage, no error).
        sampled = llm.generate(inputs, SamplingParams(temperature=1.0, max_tokens=max_tokens),
                               use_tqdm=False) if sample else []
    finally:
        llm.core.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    tokens += [list(o.outputs[0].token_ids) for o in sampled]
    logprobs = [o.outputs[0].logprobs for o in outs]
    return tokens, logprobs


def assert_same_generation(a, b, atol: float = 1e-3) -> None:
    tokens_a, lps_a = a
    tokens_b, lps_b = b
    assert tokens_a == tokens_b
    for seq_a, seq_b in zip(lps_a, lps_b, strict=True):
        for step_a, step_b in zip(seq_a, seq_b, strict=True):
            assert set(step_a) == set(step_b)
            for token in step_a:
                assert abs(_value(step_a[token]) - _value(step_b[token])) <= atol


def _value(entry) -> float:
    return entry.logprob if hasattr(entry, "logprob") else float(entry)
