"""GGUF files of the `gemma2` and `phi3` llama.cpp architectures, written here the way
llama.cpp's converter writes them (Gemma norms stored as 1 + w, Phi-3's fused qkv and
gate/up), from random HF models: our config and every weight equal transformers' own GGUF
load of the same file, and that equals the model it was written from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from engine.models.loader.gguf_model import GGUFFile, gguf_weights, hf_config_from_gguf

gguf = pytest.importorskip("gguf")

_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_name: str, arch: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *middle, kind = hf_name.split(".")
    key = ".".join(middle)
    names = {**_PROJECTIONS, **(_GEMMA_NORMS if arch == "gemma2" else {})}
    return f"blk.{layer}.{names[key]}.{kind}"


def write_gguf(model, arch: str, path, metadata: dict) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    for key, value in metadata.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = param.detach().float().numpy().copy()
        if arch == "gemma2" and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma converter stores the scale
        writer.add_tensor(_gguf_name(name, arch), data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.1 * torch.randn_like(param))
    return model


CASES = {
    "gemma2": (lambda: transformers.Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=16, max_position_embeddings=128),
        {"gemma2.attention.sliding_window": 16, "gemma2.attn_logit_softcapping": 50.0,
         "gemma2.final_logit_softcapping": 30.0}),
    "phi3": (lambda: transformers.Phi3Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        original_max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0),
        {"tokenizer.ggml.padding_token_id": 0}),  # HF's default 32000 is past this vocab
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_written_gguf_loads_like_transformers(arch, tmp_path):
    make_config, metadata = CASES[arch]
    source = random_model(make_config())
    path = tmp_path / f"{arch}.gguf"
    write_gguf(source, arch, path, metadata)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype="float32").eval()
    file = GGUFFile(str(path))
    ours = hf_config_from_gguf(file)
    assert type(ours) is type(theirs.config)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "sliding_window",
                "layer_types", "attn_logit_softcapping", "final_logit_softcapping"):
        if hasattr(theirs.config, key):
            assert getattr(ours, key) == getattr(theirs.config, key), key
    if arch == "gemma2":  # transformers takes its default (256); llama.cpp the head size
        assert ours.query_pre_attn_scalar == source.config.query_pre_attn_scalar == 32
    hf_params = dict(theirs.named_parameters())
    source_params = dict(source.named_parameters())
    seen = set()
    for name, tensor in gguf_weights(file, ours):
        torch.testing.assert_close(tensor, hf_params[name].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(tensor, source_params[name].detach(), rtol=0, atol=1e-6)
        seen.add(name)
    tied = {"lm_head.weight"} if ours.tie_word_embeddings else set()
    assert seen == set(hf_params) - tied
