"""The real SmolLM2-135M GGUF (Q4_1): our config, logits and tokenizer equal HF's own GGUF
load, the tokenizer is cached on disk for the next start, and bad GGUF input is a clear error."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from engine.engine_args import EngineArgs
from engine.models.loader.gguf_model import hf_name
from engine.models.loader.gguf_reader import GGUFFile, GGUFTensor, dequantize
from engine.tokenizer import eos_token_id, eos_token_ids, load_tokenizer

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def smollm2_config(smollm2):
    return EngineArgs(model=smollm2).create_config()


def test_config_from_gguf_metadata_matches_transformers(smollm2_config, hf_smollm2):
    ours, theirs = smollm2_config.model.hf_config, hf_smollm2.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    model = smollm2_config.model
    assert model.architecture == "LlamaForCausalLM" and model.load_format == "gguf"
    assert model.max_model_len == 8192 and model.dtype is None
    assert "<|im_start|>" in model.chat_template


def test_logits_match_hf_gguf_model(smollm2_config, hf_smollm2, smollm2_tokenizer,
                                    model_builder, prompt_runner):
    model, backend = model_builder(smollm2_config.model)
    ids = torch.tensor(smollm2_tokenizer(PROMPT).input_ids)
    with torch.no_grad():
        expected = hf_smollm2(ids[None]).logits[0].float()
    ours = prompt_runner(model, backend, ids, chunks=[len(ids) - 3, 3])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_tokenizer_round_trip_cache_and_chat_template(smollm2_config, smollm2_tokenizer,
                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    model = smollm2_config.model
    first = load_tokenizer(model)  # converts from GGUF metadata and caches
    assert os.listdir(tmp_path / "tokenizers")
    start = time.perf_counter()
    second = load_tokenizer(model)  # from the cache
    cached_seconds = time.perf_counter() - start
    text = "Hello world! Ünïcødé, code `x = 1`\n  and spaces."
    for tokenizer in (first, second):
        ids = tokenizer(text).input_ids
        assert ids == smollm2_tokenizer(text).input_ids
        assert tokenizer.decode(ids) == smollm2_tokenizer.decode(ids) == text
    assert cached_seconds < 2.0, cached_seconds
    messages = [{"role": "user", "content": "Hi"}]
    rendered = second.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered
    assert eos_token_ids(model, second) == [2]
    assert eos_token_id(model, second) == 2


def test_gguf_reader_names_and_unknown_quant_type(smollm2):
    gguf = GGUFFile(smollm2)
    assert gguf.fields["general.architecture"] == "llama"
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="blk.0.attn_fancy.weight"):
        hf_name("blk.0.attn_fancy.weight")
    fake = GGUFTensor("blk.0.attn_q.weight", (4, 32), 12345, np.zeros((4, 32), np.uint8))
    with pytest.raises(ValueError, match="type id 12345"):
        from engine.models.loader.gguf_reader import _block_layout

        _block_layout(fake.qtype, fake.name)
    q8_1 = GGUFTensor("blk.0.attn_k.weight", (1, 32), 9, np.zeros((1, 36), np.uint8))
    with pytest.raises(ValueError, match="Q8_1"):  # a type gguf cannot dequantize
        dequantize(q8_1)
    embed = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    assert dequantize(embed).shape == (49152, 576)


def test_not_a_gguf_file_is_an_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        EngineArgs(model=str(bad)).create_config()
