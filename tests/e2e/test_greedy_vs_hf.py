"""Greedy output equals HF transformers token-for-token, on the real SmolLM2 weights and on
random-weight models of other shapes, with all prompts in one batch and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "Paris is the capital of France and its largest city.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
]


def make_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, cut from natural text."""
    text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(200))
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompts = []
    for i, n in enumerate(lengths):
        start = (37 * i) % 100
        prompts.append(ids[start:start + n])
    return prompts


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, t in enumerate(tokens):  # HF keeps EOS in the output; the engine does too
        if t in eos:
            return tokens[: i + 1]
    return tokens


LENGTHS = [5, 17, 64, 130, 200, 257, 333, 420]


@pytest.fixture(scope="module")
def smollm2_llm(smollm2):
    # A small token budget so long prompts are prefilled in several chunks, mixed with decodes.
    return LLM(model=smollm2, max_num_batched_tokens=96, max_num_seqs=8,
               enable_prefix_caching=True)


def test_smollm2_greedy_matches_hf_in_one_chunked_batch(smollm2_llm, hf_smollm2,
                                                        smollm2_tokenizer):
    prompts = make_prompts(smollm2_tokenizer, LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outs = smollm2_llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_smollm2, prompt, 24)
        assert out.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens"


def test_smollm2_prefix_cache_hits_and_same_tokens(smollm2_llm, hf_smollm2, smollm2_tokenizer):
    assert smollm2_llm.reset_prefix_cache()
    before = smollm2_llm.get_metrics()["prefix_cache_hits"]
    shared = make_prompts(smollm2_tokenizer, [300])[0]
    tails = make_prompts(smollm2_tokenizer, [3, 9, 14, 20])
    prompts = [shared + t for t in tails]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    first = smollm2_llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    rest = smollm2_llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params,
                                use_tqdm=False)
    outs = first + rest
    # Every later request reused the shared prefix (full blocks only).
    block = smollm2_llm.config.cache.block_size
    for out in rest:
        assert out.num_cached_tokens >= (len(shared) // block) * block
    assert smollm2_llm.get_metrics()["prefix_cache_hits"] - before >= 3 * (len(shared) // block) * block
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_smollm2, prompt, 16)


RANDOM_SHAPES = {
    # name: (config class, kwargs)
    "llama_gqa4_hd64_tied_llama3rope": ("LlamaConfig", dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, num_hidden_layers=3, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=1024)),
    "qwen2_gqa2_hd128_untied_bias": ("Qwen2Config", dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, tie_word_embeddings=False, max_position_embeddings=1024)),
    "qwen3_mha_hd64_qknorm": ("Qwen3Config", dict(
        hidden_size=192, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4,
        head_dim=64, num_hidden_layers=2, tie_word_embeddings=True,
        max_position_embeddings=1024)),
}


@pytest.mark.parametrize("shape", sorted(RANDOM_SHAPES))
def test_random_weight_models_match_hf(shape, tmp_path, smollm2_tokenizer):
    import transformers

    cls_name, kwargs = RANDOM_SHAPES[shape]
    config = getattr(transformers, cls_name)(
        vocab_size=len(smollm2_tokenizer), initializer_range=0.2, **kwargs,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)

    llm = LLM(model=str(tmp_path), max_num_batched_tokens=64, num_kv_blocks=128)
    prompts = make_prompts(smollm2_tokenizer, [7, 40, 90, 150])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                    do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist(), shape
