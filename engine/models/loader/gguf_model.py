"""What a GGUF file means in HF terms: its config and its tensors under HF names.

Rule: build the HF config from the GGUF metadata directly (transformers' GGUF path decodes
the whole vocabulary first and takes seconds), and undo llama.cpp's conversion on the way
out: rename tensors to HF names and reverse the q/k row permutation of Llama checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from engine.models.loader.gguf_reader import GGUFFile, SkippedArray

# GGUF `general.architecture` -> (HF model_type, HF architecture name)
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp permutes the q/k rows of Llama checkpoints only (for its own rope layout).
_PERMUTED_ARCHITECTURES = ("llama",)

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that the HF model recomputes (llama3 rope factors).
_DERIVED_NAMES = ("rope_freqs.weight",)


def gguf_architecture(gguf: GGUFFile) -> tuple[str, str, str]:
    """(GGUF architecture, HF model_type, HF architecture name), or ValueError."""
    arch = gguf.fields.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} in {gguf.path} is not supported; supported GGUF "
            f"architectures: {', '.join(sorted(_ARCHITECTURES))}."
        )
    return arch, *_ARCHITECTURES[arch]


def hf_config_from_gguf(gguf: GGUFFile) -> Any:
    """The transformers config equivalent to the GGUF metadata (float32 weights)."""
    from transformers import AutoConfig

    arch, model_type, architecture = gguf_architecture(gguf)
    f = gguf.fields

    def get(key: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        vocab = tokens.count if isinstance(tokens, SkippedArray) else len(tokens or [])
    rope: dict[str, Any] = {"rope_theta": float(get("rope.freq_base", 10000.0)),
                            "rope_type": "default"}
    if get("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    names = {t.name for t in gguf.tensors}
    kwargs = dict(
        architectures=[architecture],
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(num_heads),
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in names
    return AutoConfig.for_model(model_type, **kwargs)


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF parameter name; None for tensors the model recomputes."""
    if gguf_name in _DERIVED_NAMES:
        return None
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.<i>.<name>.<weight|bias>
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent this engine knows.")


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rope permutation of q/k rows: within each head it interleaved the two
    rotary halves ([h, 2, d/2] -> [h, d/2, 2]); put them back."""
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def gguf_weights(gguf: GGUFFile, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for each GGUF tensor, dequantized one at a time."""
    from engine.models.loader.gguf_reader import dequantize

    arch = gguf.fields.get("general.architecture")
    heads = {"q_proj": hf_config.num_attention_heads, "k_proj": hf_config.num_key_value_heads}
    for tensor in gguf.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        weight = dequantize(tensor)
        proj = name.split(".")[-2]
        if arch in _PERMUTED_ARCHITECTURES and proj in heads:
            weight = _unpermute(weight, heads[proj])
        yield name, weight


__all__ = ["GGUFFile", "gguf_weights", "hf_config_from_gguf", "hf_name"]
