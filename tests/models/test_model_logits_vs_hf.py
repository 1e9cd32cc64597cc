"""Our Llama/Qwen2/Qwen3 logits equal HF transformers' on random-weight checkpoints of several
shapes (GQA 1/2/4, head_dim 64/128, tied and untied, llama3 rope, qkv bias, qk-norm), in one
step and in chunks over a paged cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from engine.engine_args import EngineArgs

VOCAB = 1000
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    # GQA 1, head_dim 64, untied, llama3 rope scaling
    "llama-llama3rope": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    # GQA 4, head_dim 128 from config, tied, Mistral architecture name
    "mistral-tied-hd128": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, tie_word_embeddings=True,
        architectures=["MistralForCausalLM"]),
    # GQA 2, head_dim 64, tied, qkv bias
    "qwen2-bias": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True),
    # GQA 4, head_dim 128 (larger than hidden/heads), untied, qk-norm
    "qwen3-qknorm": lambda: Qwen3Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=256, tie_word_embeddings=False),
}


def save_random_model(config, directory, max_shard_size: str | None = None):
    """An HF model with every parameter random (biases and norm scales included, which HF
    initialises to constants that would hide loading bugs), saved as safetensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids[None]).logits[0].float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_in_one_step_and_in_chunks(case, tmp_path, model_builder,
                                                   prompt_runner):
    config = CASES[case]()
    hf_model = save_random_model(config, tmp_path)
    model_config = EngineArgs(model=str(tmp_path)).create_config().model
    model, backend = model_builder(model_config)

    input_ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf_model, input_ids)
    ours = prompt_runner(model, backend, input_ids)
    assert ours.dtype == torch.float32 and ours.shape == (37, VOCAB)
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))

    # Chunked prefill: 20 tokens (crossing a block boundary), then the remaining 17 with
    # num_computed > 0 reading the first chunk's keys from the paged cache.
    chunked = prompt_runner(model, backend, input_ids, chunks=[20, 16, 1])
    torch.testing.assert_close(chunked, ours, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_bfloat16_model_runs_in_its_dtype_with_float32_logits(tmp_path, model_builder,
                                                             prompt_runner):
    hf_model = save_random_model(CASES["qwen2-bias"](), tmp_path)
    model_config = EngineArgs(model=str(tmp_path), dtype="bfloat16").create_config().model
    assert model_config.dtype == torch.bfloat16
    model, backend = model_builder(model_config, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

    input_ids = torch.arange(5, 25)
    ours = prompt_runner(model, backend, input_ids)
    assert ours.dtype == torch.float32
    expected = hf_logits(hf_model, input_ids)
    # bfloat16 keeps ~3 significant digits: same predictions, loosely equal values.
    assert (ours - expected).abs().max() < 0.1 * expected.abs().max()
