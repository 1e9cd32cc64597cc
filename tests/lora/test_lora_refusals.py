"""Adapters the engine cannot run are refused with a ValueError that names the numbers (the
API turns it into a 400), and a refused adapter takes no slot."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from engine.config import LoRAConfig
from engine.lora import read_adapter_config
from tests.lora.conftest import (
    ALL_TARGETS,
    build_lora_model,
    edit_adapter_config,
    make_adapter,
    random_hf_model,
    request,
    tiny_llama_config,
)


@pytest.fixture
def bound(base_dir):
    return build_lora_model(base_dir, LoRAConfig(max_loras=1, max_lora_rank=8))


def refused(bound, directory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bound.manager.slot_of(request(7, directory))
    assert bound.manager.device_ids == [] and bound.manager.host_ids == []


def test_a_rank_above_max_lora_rank(bound, base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=16, lora_alpha=16, target_modules=["q_proj"])
    refused(bound, tmp_path, r"rank 16, above --max-lora-rank 8")


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_embedding_and_lm_head_targets(bound, base_dir, tmp_path, target):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", target])
    refused(bound, tmp_path, rf"targets {target} .*not supported")


def test_a_target_module_the_model_lacks(bound, base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_adapter_config(tmp_path, target_modules=["q_proj", "qkv_linear"])
    refused(bound, tmp_path, r"targets module 'qkv_linear', which this model does not have")


def test_a_tensor_for_a_module_the_model_lacks(bound, base_dir, tmp_path):
    """target_modules as a regex passes the name check; the tensors still must map."""
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_adapter_config(tmp_path, target_modules=r".*proj")
    file = tmp_path / "adapter_model.safetensors"
    tensors = {name.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.x_proj"): t
               for name, t in load_file(file).items()}
    save_file(tensors, file)
    refused(bound, tmp_path, r"'model.layers.1.self_attn.x_proj', which this model does not")


def test_shapes_of_another_model(bound, tmp_path):
    other = tmp_path / "other"
    random_hf_model(tiny_llama_config(intermediate_size=96)).save_pretrained(other)
    make_adapter(other, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_TARGETS)
    refused(bound, tmp_path / "adapter", r"down_proj' maps 96 -> 64 features, the base "
                                         r"model's layer 128 -> 64")


def test_dora(bound, base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"],
                 use_dora=True)
    refused(bound, tmp_path, r"DoRA \(use_dora\)")


@pytest.mark.parametrize(("change", "match"), [
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save"),
    ({"bias": "all"}, r"bias='all'"),
    ({"rank_pattern": {"q_proj": 2}}, r"rank_pattern"),
    ({"peft_type": "IA3"}, r"IA3 adapter"),
])
def test_unsupported_peft_options(bound, base_dir, tmp_path, change, match):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_adapter_config(tmp_path, **change)
    refused(bound, tmp_path, match)


def test_lora_dropout_is_fine_at_inference(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"],
                 lora_dropout=0.1)
    assert read_adapter_config(str(tmp_path), max_rank=8).scaling == 2.0


def test_a_directory_that_is_not_a_peft_adapter(bound, tmp_path):
    refused(bound, tmp_path, r"no adapter_config.json")


def test_pickled_weights_only(bound, base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    refused(bound, tmp_path, r"adapter_model.bin: pickled weights are not loaded")


def test_fewer_host_adapters_than_device_slots(base_dir):
    with pytest.raises(ValueError, match="max_cpu_loras=1 is below max_loras=2"):
        build_lora_model(base_dir, LoRAConfig(max_loras=2, max_lora_rank=8, max_cpu_loras=1))
