"""Config features the engine does not implement are refused at load, naming the field and the
way out, where running without them would silently give other outputs than the model's: a
sliding attention window shorter than --max-model-len (Mistral, Qwen2 with
use_sliding_window), and quantized checkpoints."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer
from engine.engine_args import EngineArgs

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _config(tmp_path, config, **args):
    config.save_pretrained(tmp_path)
    save_word_level_tokenizer(str(tmp_path), config.vocab_size)
    return EngineArgs(model=str(tmp_path), load_format="dummy", **args).create_config()


def test_a_window_shorter_than_the_context_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sliding_window=64: .*--max-model-len 64"):
        _config(tmp_path, MistralConfig(sliding_window=64, **SMALL))


def test_within_the_window_attention_is_full_attention(tmp_path):
    config = _config(tmp_path, MistralConfig(sliding_window=64, **SMALL), max_model_len=64)
    assert config.model.max_model_len == 64


def test_mistral_without_a_window_and_qwen2_with_it_off_load(tmp_path):
    assert _config(tmp_path / "m", MistralConfig(sliding_window=None, **SMALL)).model
    off = Qwen2Config(use_sliding_window=False, sliding_window=32, **SMALL)
    assert _config(tmp_path / "q", off).model.max_model_len == 256


def test_qwen2_sliding_layers_are_refused(tmp_path):
    on = Qwen2Config(use_sliding_window=True, sliding_window=32, max_window_layers=1, **SMALL)
    assert "sliding_attention" in on.layer_types
    with pytest.raises(ValueError, match="sliding_window=32"):
        _config(tmp_path, on)


def test_a_quantized_checkpoint_is_refused_by_method(tmp_path):
    config = LlamaConfig(**SMALL)
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method 'gptq'\)"):
        _config(tmp_path, config)
