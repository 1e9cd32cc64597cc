"""Gemma 2 and Gemma 3 (text) on random-weight checkpoints equal HF transformers through the
real `LLM`: greedy tokens, and the log-probabilities of every prompt position, with sliding
and full layers mixed, prompts longer than the window, chunked prefill in one batch, prefix
caching on and off."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.models.layers.layernorm import GemmaRMSNorm
from platforms import kernels

WINDOW = 16
MAX_MODEL_LEN = 128
PROMPT_LENGTHS = [5, 23, 47, 90]  # the last three are longer than the window
MAX_TOKENS = 10
TOP = 4  # prompt logprobs compared per position


def gemma2_config(vocab: int, **overrides) -> transformers.PretrainedConfig:
    kwargs = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW, query_pre_attn_scalar=24,  # not head_dim: the scale is tested
        attn_logit_softcapping=4.0, final_logit_softcapping=8.0,  # low enough to bite
        max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Gemma2Config(**kwargs)


def gemma3_config(vocab: int, **overrides) -> transformers.PretrainedConfig:
    kwargs = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=WINDOW, query_pre_attn_scalar=32, final_logit_softcapping=None,
        # Two rope settings: local base for sliding layers, global base + linear scaling.
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1_000_000.0}},
        max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


CASES = {"gemma2": gemma2_config, "gemma3": gemma3_config}


def save_random_model(config, directory, tokenizer) -> torch.nn.Module:
    """Every parameter random (Gemma's norm weights w too: HF starts them at 0), saved."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((0.3 if "norm" in name else 0.15) * torch.randn_like(param))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def make_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: log-probabilities of the token after each prompt position."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check_against_hf(llm: LLM, hf_model, prompts: list[list[int]], label: str,
                     check_prompt_logprobs: bool = True) -> None:
    """Greedy tokens, and the prompt logprobs (positions found in the prefix cache are not
    computed again, so a run that hits it checks the tokens only)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            prompt_logprobs=TOP if check_prompt_logprobs else None)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS), (
            f"{label}: prompt of {len(prompt)} tokens")
        if not check_prompt_logprobs:
            continue
        expected = hf_prompt_logprobs(hf_model, prompt)
        for pos, position in enumerate(out.prompt_logprobs[1:]):
            for token, logprob in position.items():
                assert math.isclose(logprob.logprob, expected[pos, token].item(),
                                    rel_tol=1e-4, abs_tol=1e-4), (
                    f"{label}: prompt of {len(prompt)} tokens, position {pos + 1}")


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_random_gemma_matches_hf_past_the_window(case, prefix_caching, tmp_path,
                                                 smollm2_tokenizer):
    vocab = len(smollm2_tokenizer)
    hf_model = save_random_model(CASES[case](vocab), tmp_path, smollm2_tokenizer)
    # A small token budget: the long prompts are prefilled in chunks, beside decodes.
    llm = LLM(model=str(tmp_path), max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=32,
              num_kv_blocks=64, enable_prefix_caching=prefix_caching)
    prompts = make_prompts(vocab, PROMPT_LENGTHS)
    check_against_hf(llm, hf_model, prompts, case)
    if prefix_caching:  # again, a shared prefix longer than the window found in the cache
        shared = prompts[3][:70]
        again = [shared + make_prompts(vocab, [n], seed=n)[0] for n in (3, 11)]
        check_against_hf(llm, hf_model, again, f"{case} cached", check_prompt_logprobs=False)
        assert llm.get_metrics()["prefix_cache_hits"] > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_gemma_matches_hf_within_the_window(case, tmp_path, smollm2_tokenizer):
    """max_model_len <= sliding_window: the window covers the whole context."""
    vocab = len(smollm2_tokenizer)
    hf_model = save_random_model(CASES[case](vocab, sliding_window=64), tmp_path,
                                 smollm2_tokenizer)
    llm = LLM(model=str(tmp_path), max_model_len=64, max_num_batched_tokens=16,
              num_kv_blocks=48, enable_prefix_caching=True)
    check_against_hf(llm, hf_model, make_prompts(vocab, [5, 19, 40]), case)


def test_gemma_norm_and_activation_equal_hf():
    """The pieces: (1 + w) in float32 with one rounding (bfloat16 too), and gelu-tanh."""
    from transformers.activations import ACT2FN
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        theirs = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
        ours = GemmaRMSNorm(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(48))
            ours.weight.copy_(theirs.weight)
        x, residual = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
        assert torch.equal(ours(x), theirs(x))
        normed, summed = ours(x, residual)
        assert torch.equal(summed, residual + x) and torch.equal(normed, theirs(residual + x))
    x = torch.randn(7, 2 * 40) * 4
    gate, up = x.chunk(2, dim=-1)
    expected = ACT2FN["gelu_pytorch_tanh"](gate) * up
    assert torch.equal(kernels.gelu_tanh_and_mul(x), expected)


def test_gemma3_multimodal_and_bidirectional_configs_are_refused(tmp_path, smollm2_tokenizer):
    from engine.engine_args import EngineArgs

    text = gemma3_config(len(smollm2_tokenizer), use_bidirectional_attention=True)
    text.architectures = ["Gemma3ForCausalLM"]
    text.save_pretrained(tmp_path / "bidi")
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        LLM(model=str(tmp_path / "bidi"), max_model_len=16)
    multimodal = transformers.Gemma3Config(text_config=gemma3_config(1000).to_dict())
    multimodal.architectures = ["Gemma3ForConditionalGeneration"]
    multimodal.save_pretrained(tmp_path / "mm")
    with pytest.raises(ValueError, match="text-only"):
        EngineArgs(model=str(tmp_path / "mm")).create_config()
