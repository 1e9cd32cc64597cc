"""Config features are honoured or refused at load, never ignored: sliding windows become
KV-cache groups (refused, naming the feature, on a platform whose attention lacks them), and
quantized checkpoints are refused by method."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer
from engine.engine_args import EngineArgs
from engine.engine_core.core import resolve_for_platform
from engine.models.layers.attention import kv_cache_layout
from engine.worker.model_runner import ModelRunner
from platforms.cpu.platform import CpuPlatform

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _config(tmp_path, config, **args):
    config.save_pretrained(tmp_path)
    save_word_level_tokenizer(str(tmp_path), config.vocab_size)
    return EngineArgs(model=str(tmp_path), load_format="dummy", **args).create_config()


def test_windows_become_kv_cache_groups(tmp_path):
    mistral = _config(tmp_path / "m", MistralConfig(sliding_window=64, **SMALL))
    assert kv_cache_layout(mistral.model).windows == (64,)
    # Within --max-model-len <= window, attention over the window is attention over all.
    within = _config(tmp_path / "w", MistralConfig(sliding_window=64, **SMALL),
                     max_model_len=64)
    assert kv_cache_layout(within.model).windows == (None,)
    on = Qwen2Config(use_sliding_window=True, sliding_window=32, max_window_layers=1, **SMALL)
    layout = kv_cache_layout(_config(tmp_path / "q", on).model)
    assert [(g.sliding_window, g.layers) for g in layout.groups] == [(None, (0,)), (32, (1,)),
                                                                       (32, (2,))]
    off = Qwen2Config(use_sliding_window=False, sliding_window=32, **SMALL)
    assert kv_cache_layout(_config(tmp_path / "o", off).model).windows == (None,)


class _NoWindowsPlatform(CpuPlatform):
    """A platform whose attention implements none of the optional features."""

    capabilities = dataclasses.replace(CpuPlatform.capabilities,
                                       attention_features=frozenset())


def test_a_platform_without_windows_refuses_a_windowed_model(tmp_path):
    config = _config(tmp_path, MistralConfig(sliding_window=64, **SMALL))
    platform = _NoWindowsPlatform()
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    with pytest.raises(ValueError, match="does not implement: sliding_window"):
        runner.load_model()


def test_a_quantized_checkpoint_is_refused_by_method(tmp_path):
    config = LlamaConfig(**SMALL)
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method 'gptq'\)"):
        _config(tmp_path, config)
