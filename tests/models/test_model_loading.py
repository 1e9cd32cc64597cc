"""Loading: sharded safetensors, dummy weights, registry and path errors, and the config
resolution rules (dtype, max_model_len, token budget, generation defaults, chat template)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from engine.engine_args import EngineArgs
from engine.models.loader.resolve import checkpoint_dtype
from engine.models.registry import get_model_class, supported_architectures
from engine.tokenizer import eos_token_id, eos_token_ids

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config_dir(directory, **overrides) -> str:
    LlamaConfig(**{**TINY, **overrides}).save_pretrained(directory)
    return str(directory)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny Llama with random HF weights, saved in 3 safetensors shards."""
    from test_model_logits_vs_hf import save_random_model

    model = save_random_model(LlamaConfig(**TINY), tmp_path, max_shard_size="60KB")
    return str(tmp_path), model


def test_sharded_safetensors_load_every_tensor(tiny_checkpoint, model_builder, prompt_runner):
    directory, hf_model = tiny_checkpoint
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= 2
    model, backend = model_builder(EngineArgs(model=directory).create_config().model)
    ids = torch.arange(1, 20)
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(prompt_runner(model, backend, ids), expected,
                               rtol=1e-4, atol=1e-5)


def test_missing_and_unexpected_weights_are_errors(tiny_checkpoint, model_builder):
    directory, _ = tiny_checkpoint
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = os.path.join(directory, index["weight_map"][name])
    tensors = load_file(shard)
    tensors.pop(name)
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mlp.extra.weight"):
        model_builder(EngineArgs(model=directory).create_config().model)
    tensors.pop("model.layers.1.mlp.extra.weight")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for model\.layers\.1\.mlp\.down_proj"):
        model_builder(EngineArgs(model=directory).create_config().model)
    # One shard of a merged projection missing (k of q/k/v) is missing too.
    tensors[name] = torch.zeros(64, 128)
    save_file(tensors, shard, metadata={"format": "pt"})
    k_name = "model.layers.0.self_attn.k_proj.weight"
    k_shard = os.path.join(directory, index["weight_map"][k_name])
    tensors = load_file(k_shard)
    tensors.pop(k_name)
    save_file(tensors, k_shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for .*self_attn\.qkv_proj"):
        model_builder(EngineArgs(model=directory).create_config().model)


def test_dummy_weights_need_no_files_and_are_seeded(tmp_path, model_builder, prompt_runner):
    directory = tiny_config_dir(tmp_path)
    config = EngineArgs(model=directory, load_format="dummy").create_config().model
    assert config.load_format == "dummy"
    first, backend = model_builder(config)
    second, _ = model_builder(config)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(),
                                     strict=True):
        assert torch.equal(a, b), name
    assert first.model.layers[0].mlp.down_proj.weight.std() < 0.1
    logits = prompt_runner(first, backend, torch.arange(10))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_safetensors_load_format_without_weights_is_a_clear_error(tmp_path, model_builder):
    config = EngineArgs(model=tiny_config_dir(tmp_path)).create_config().model
    with pytest.raises(ValueError, match="No safetensors weights.*--load-format dummy"):
        model_builder(config)


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    directory = tiny_config_dir(tmp_path, architectures=["FancyNewForCausalLM"])
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as err:
        EngineArgs(model=directory).create_config()
    for name in supported_architectures():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_unknown_path_and_offline_hub_id_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        EngineArgs(model=str(tmp_path / "no-such-model")).create_config()
    with pytest.raises(ValueError, match="no config.json"):
        EngineArgs(model=str(tmp_path)).create_config()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not found locally.*download it.*local path"):
        EngineArgs(model="engine-tests/surely-not-cached-model").create_config()


def test_dtype_auto_is_none_and_checkpoint_dtype_is_the_configs(tmp_path):
    directory = tiny_config_dir(tmp_path, dtype="bfloat16")
    auto = EngineArgs(model=directory).create_config().model
    assert auto.dtype is None
    assert checkpoint_dtype(auto) == torch.bfloat16
    assert EngineArgs(model=directory, dtype="half").create_config().model.dtype == torch.float16


def test_max_model_len_and_token_budget_rules(tmp_path):
    directory = tiny_config_dir(tmp_path)
    config = EngineArgs(model=directory).create_config()
    assert config.model.max_model_len == 128
    assert config.scheduler.max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match=r"256.*128.*--max-model-len"):
        EngineArgs(model=directory, max_model_len=256).create_config()
    no_chunks = EngineArgs(model=directory, enable_chunked_prefill=False).create_config()
    assert no_chunks.scheduler.max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match=r"max_num_batched_tokens 64.*max_model_len 128"):
        EngineArgs(model=directory, enable_chunked_prefill=False,
                   max_num_batched_tokens=64).create_config()
    small = EngineArgs(model=directory, max_model_len=100, max_num_batched_tokens=50)
    assert small.create_config().scheduler.max_num_batched_tokens == 50


def test_generation_defaults_chat_template_and_eos(tmp_path):
    directory = tiny_config_dir(tmp_path, eos_token_id=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                   "eos_token_id": [7, 2]}, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ messages[0]['content'] }}"}, f)
    config = EngineArgs(model=directory).create_config().model
    assert config.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert config.chat_template == "{{ messages[0]['content'] }}"
    assert eos_token_ids(config) == [7, 2]
    assert eos_token_id(config) == 7  # no tokenizer: the first of the list
    assert EngineArgs(model=directory, generation_config="none").create_config() \
        .model.generation_defaults is None

    template_file = tmp_path / "t.jinja"
    template_file.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    override = EngineArgs(model=directory, chat_template=str(template_file)).create_config()
    assert override.model.chat_template.startswith("{% for m in messages %}")
    with pytest.raises(ValueError, match="--chat-template"):
        EngineArgs(model=directory, chat_template="missing.jinja").create_config()


def test_load_format_must_fit_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--load-format"):
        EngineArgs(model=tiny_config_dir(tmp_path), load_format="gguf").create_config()


def test_hub_id_is_served_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id already in the HF cache resolves offline to its snapshot directory."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--engine-tests--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    tiny_config_dir(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = EngineArgs(model="engine-tests/tiny-llama", load_format="dummy").create_config()
    assert os.path.samefile(config.model.model, snapshot)
    assert config.model.tokenizer == config.model.model
    assert config.model.architecture == "LlamaForCausalLM"
