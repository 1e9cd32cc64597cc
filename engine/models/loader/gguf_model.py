"""What a GGUF file means in HF terms: its config and its tensors under HF names.

Rule: build the HF config from the GGUF metadata directly (transformers' GGUF path decodes
the whole vocabulary first and takes seconds), and undo llama.cpp's conversion on the way
out: rename tensors to HF names, reverse the q/k row permutation of Llama checkpoints, and
take back the 1 llama.cpp adds to Gemma's norm weights (it stores the scale, 1 + w; HF and
transformers' own GGUF loader keep w). Where the metadata is silent, the config takes what
llama.cpp assumes for the architecture (Gemma 3's local rope base and layer pattern).
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
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),  # the text model only (as transformers)
    "phi3": ("phi3", "Phi3ForCausalLM"),
}
_GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
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
# Where an architecture's blocks name a tensor differently: Gemma's four norms per block
# (ffn_norm is the norm before the MLP there, not after attention), Phi-3's fused projections.
_GEMMA_BLOCK_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "gemma2": _GEMMA_BLOCK_NAMES,
    "gemma3": _GEMMA_BLOCK_NAMES,
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
# Tensors llama.cpp adds that the HF model recomputes (llama3 rope factors; Phi-3's longrope
# factors, which go into the config's rope_parameters).
_DERIVED_NAMES = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_PHI3_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight",
                      "short_factor": "rope_factors_short.weight"}
# Layer counts of the 27B Gemmas, whose softmax scale llama.cpp takes from hidden / heads
# rather than head_dim (query_pre_attn_scalar 144 and 168).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


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
    if arch in _GEMMA_ARCHITECTURES:
        kwargs.update(_gemma_kwargs(gguf, arch, kwargs))
    if arch == "phi3":
        kwargs.update(_phi3_kwargs(gguf, kwargs))
    return AutoConfig.for_model(model_type, **kwargs)


def _gemma_kwargs(gguf: GGUFFile, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2/3 settings: window, softmax scale, soft-caps, and (Gemma 3) the layer pattern
    and the two rope settings, as llama.cpp reads or assumes them."""
    f = gguf.fields
    layers, head_dim = kwargs["num_hidden_layers"], kwargs["head_dim"]
    scalar = (kwargs["hidden_size"] // kwargs["num_attention_heads"]
              if layers == _GEMMA_27B_LAYERS[arch] else head_dim)
    out: dict[str, Any] = {"query_pre_attn_scalar": scalar,
                           "hidden_activation": "gelu_pytorch_tanh"}
    window = f.get(f"{arch}.attention.sliding_window")
    if window is not None:
        out["sliding_window"] = int(window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if f.get(f"{arch}.{key}") is not None:
            out[key] = float(f[f"{arch}.{key}"])
    if arch == "gemma3":
        pattern = f.get("gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == layers:  # per layer: is it sliding?
            sliding = [bool(p) for p in pattern]
        else:  # llama.cpp's Gemma 3: five sliding layers, then a full one
            sliding = [(i + 1) % 6 != 0 for i in range(layers)]
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        # llama.cpp's Gemma 3 sliding layers: base 10000 and no scaling; full layers take
        # the file's base and scaling.
        out["rope_parameters"] = {
            "full_attention": kwargs["rope_parameters"],
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    return out


def _phi3_kwargs(gguf: GGUFFile, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Phi-3 settings: LongRoPE from the factor tensors llama.cpp stores, a rotary dimension
    smaller than the head (partial rotary, refused by the model), the sliding window."""
    f = gguf.fields
    out: dict[str, Any] = {"hidden_act": "silu"}
    rope = dict(kwargs["rope_parameters"])
    rotary_dims = f.get("phi3.rope.dimension_count")
    if rotary_dims is not None and int(rotary_dims) != kwargs["head_dim"]:
        rope["partial_rotary_factor"] = int(rotary_dims) / kwargs["head_dim"]
    factors = {key: next((t for t in gguf.tensors if t.name == name), None)
               for key, name in _PHI3_ROPE_FACTORS.items()}
    if all(t is not None for t in factors.values()):
        from engine.models.loader.gguf_reader import dequantize

        original = f.get("phi3.rope.scaling.original_context_length",
                         kwargs["max_position_embeddings"])
        rope.update(rope_type="longrope", original_max_position_embeddings=int(original),
                    **{key: dequantize(t).tolist() for key, t in factors.items()})
        if f.get("phi3.rope.scaling.attn_factor") is not None:
            rope["attention_factor"] = float(f["phi3.rope.scaling.attn_factor"])
        out["original_max_position_embeddings"] = int(original)
    out["rope_parameters"] = rope
    window = f.get("phi3.attention.sliding_window")
    if window:
        out["sliding_window"] = int(window)
    return out


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> HF parameter name (for GGUF architecture `arch`); None for
    tensors the model recomputes."""
    if gguf_name in _DERIVED_NAMES:
        return None
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.<i>.<name>.<weight|bias>
    block_names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{parts[3]}"
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
        name = hf_name(tensor.name, arch)
        if name is None:
            continue
        weight = dequantize(tensor)
        proj = name.split(".")[-2]
        if arch in _PERMUTED_ARCHITECTURES and proj in heads:
            weight = _unpermute(weight, heads[proj])
        if arch in _GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
            weight -= 1.0  # llama.cpp stored 1 + w
        yield name, weight


__all__ = ["GGUFFile", "gguf_weights", "hf_config_from_gguf", "hf_name"]
