"""Phi-3 on random-weight checkpoints equals HF transformers through the real `LLM`: the fused
qkv/gate_up projections, LongRoPE (the long factors and the cos/sin scale of a model whose
context is longer than the original one), and a sliding window on every layer; greedy tokens and
prompt log-probabilities, chunked prefill in one batch, prefix caching on and off."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.models.layers.rotary import cos_sin_cache, rope_settings

ORIGINAL = 64  # LongRoPE's original context
MAX_MODEL_LEN = 256
MAX_TOKENS = 10
TOP = 4


def phi3_config(vocab: int, **overrides) -> transformers.PretrainedConfig:
    gen = torch.Generator().manual_seed(3)
    half = 16 // 2  # head_dim 16
    kwargs = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN,
        original_max_position_embeddings=ORIGINAL,
        rope_scaling={"type": "longrope",  # the older spelling ("su" is older still)
                      "short_factor": (1 + torch.rand(half, generator=gen)).tolist(),
                      "long_factor": (1 + 4 * torch.rand(half, generator=gen)).tolist()},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Phi3Config(**kwargs)


def save_random_model(config, directory, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def make_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def check_against_hf(llm: LLM, hf_model, prompts: list[list[int]], label: str,
                     check_prompt_logprobs: bool = True) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            prompt_logprobs=TOP if check_prompt_logprobs else None)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            logits = hf_model(torch.tensor([prompt])).logits[0].float()
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), (
            f"{label}: prompt of {len(prompt)} tokens")
        if not check_prompt_logprobs:
            continue
        expected = torch.log_softmax(logits, dim=-1)
        for pos, position in enumerate(out.prompt_logprobs[1:]):
            for token, logprob in position.items():
                assert math.isclose(logprob.logprob, expected[pos, token].item(),
                                    rel_tol=1e-4, abs_tol=1e-4), (
                    f"{label}: prompt of {len(prompt)} tokens, position {pos + 1}")


@pytest.mark.parametrize("max_position", [MAX_MODEL_LEN, ORIGINAL])
def test_longrope_cache_equals_transformers(max_position):
    """Our cos/sin rows equal HF's rotary output, scale included: the long factors for a
    model whose context is longer than the original one (HF: a sequence that long), the
    short ones (and no scale) for a model of the original context."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = phi3_config(1000, max_position_embeddings=max_position)
    cache = cos_sin_cache(16, max_position, *rope_settings(config))
    rope = Phi3RotaryEmbedding(config)
    cos, sin = rope(torch.zeros(1), torch.arange(max_position)[None])
    torch.testing.assert_close(cache[:, :8], cos[0, :, :8], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache[:, 8:], sin[0, :, :8], rtol=1e-6, atol=1e-6)
    assert (rope.attention_scaling > 1.0) == (max_position > ORIGINAL)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_random_phi3_longrope_matches_hf(prefix_caching, tmp_path, smollm2_tokenizer):
    """Prompts longer than the original context, where HF uses the long factors for the
    whole sequence, as this engine does for a model of a longer context."""
    vocab = len(smollm2_tokenizer)
    hf_model = save_random_model(phi3_config(vocab), tmp_path, smollm2_tokenizer)
    llm = LLM(model=str(tmp_path), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=24,
              num_kv_blocks=64, enable_prefix_caching=prefix_caching)
    prompts = make_prompts(vocab, [65, 90, 130])
    check_against_hf(llm, hf_model, prompts, "phi3 longrope")


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
def test_random_phi3_sliding_window_matches_hf(prefix_caching, tmp_path, smollm2_tokenizer):
    vocab = len(smollm2_tokenizer)
    config = phi3_config(vocab, rope_scaling=None, original_max_position_embeddings=128,
                         max_position_embeddings=128, sliding_window=16)
    hf_model = save_random_model(config, tmp_path, smollm2_tokenizer)
    llm = LLM(model=str(tmp_path), max_model_len=128, max_num_batched_tokens=24,
              num_kv_blocks=64, enable_prefix_caching=prefix_caching)
    check_against_hf(llm, hf_model, make_prompts(vocab, [5, 23, 47, 90]), "phi3 window")


def test_partial_rotary_is_refused(tmp_path, smollm2_tokenizer):
    config = phi3_config(len(smollm2_tokenizer), rope_scaling=None,
                         partial_rotary_factor=0.5)
    save_random_model(config, tmp_path, smollm2_tokenizer)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LLM(model=str(tmp_path), max_model_len=64)
