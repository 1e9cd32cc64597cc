"""What a GGUF file means in HF terms: its config and its tensors under HF names.

Rule: build the HF config from the GGUF metadata directly (transformers' GGUF path decodes
the whole vocabulary first and takes seconds), and undo llama.cpp's conversion on the way
out: rename tensors to HF names, reverse the q/k row permutation of Llama checkpoints, and
take back the 1 llama.cpp adds to Gemma's norm weights (it stores the scale, 1 + w; HF and
transformers' own GGUF loader keep w). Where the metadata is silent, the config takes what
llama.cpp assumes for the architecture (Gemma 3's local rope base and layer pattern).

Mixtures of experts: `qwen2moe`, `qwen3moe`, and `llama` with `llama.expert_count` (Mixtral)
store each layer's experts stacked (`ffn_{gate,up,down}_exps`, [E, I, H] / [E, H, I]) or, in
old Mixtral files, one tensor per expert (`ffn_gate.<e>`); both come out as HF per-expert
tensors. llama.cpp renormalises the top-k for Mixtral and Qwen3-MoE, not for Qwen2-MoE
(`expert_weights_norm` overrides), and makes a layer sparse iff it has a router
(`ffn_gate_inp`): the others become the config's `mlp_only_layers`.
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
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# `llama` files with experts are Mixtral.
_MIXTRAL = ("mixtral", "MixtralForCausalLM")
_MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")
# Whether llama.cpp renormalises the top-k expert weights, when the file does not say.
_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}
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
    "ffn_gate_inp": "mlp.gate",  # the router, [E, H]
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",  # [H] here, [1, H] in HF
}
# Stacked experts ([E, ...]) and, in old Mixtral files, one expert per tensor
# (blk.<i>.ffn_gate.<e>.weight): -> model.layers.<i>.mlp.experts.<e>.<proj>.weight.
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                 "ffn_down_exps": "down_proj"}
_PER_EXPERT_NAMES = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
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
    if arch == "llama" and gguf.fields.get("llama.expert_count"):
        return arch, *_MIXTRAL
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
    if get("expert_count"):
        kwargs.update(_moe_kwargs(gguf, arch, kwargs))
    return AutoConfig.for_model(model_type, **kwargs)


def _moe_kwargs(gguf: GGUFFile, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Mixture-of-experts settings: expert counts and sizes, top-k renormalisation, and
    which layers are sparse (those with a router tensor)."""
    f = gguf.fields

    def get(key: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{key}", default)

    num_experts, top_k = int(get("expert_count")), int(get("expert_used_count"))
    expert_size = int(get("expert_feed_forward_length", kwargs["intermediate_size"]))
    norm = bool(get("expert_weights_norm", _EXPERT_WEIGHTS_NORM.get(arch, True)))
    if arch == "llama":  # Mixtral: every layer sparse, experts of feed_forward_length
        return {"num_local_experts": num_experts, "num_experts_per_tok": top_k,
                "intermediate_size": expert_size, "hidden_act": "silu"}
    names = {t.name for t in gguf.tensors}
    dense = [i for i in range(kwargs["num_hidden_layers"])
             if f"blk.{i}.ffn_gate_inp.weight" not in names]
    out: dict[str, Any] = {"num_experts": num_experts, "num_experts_per_tok": top_k,
                           "moe_intermediate_size": expert_size, "norm_topk_prob": norm,
                           "decoder_sparse_step": 1, "mlp_only_layers": dense,
                           "hidden_act": "silu"}
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = int(
            get("expert_shared_feed_forward_length", kwargs["intermediate_size"]))
        out["qkv_bias"] = "blk.0.attn_q.bias" in names
    return out


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
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _EXPERT_NAMES:
        # Stacked: the caller splits it (`<e>` is each expert's index).
        return f"model.layers.{parts[1]}.mlp.experts.<e>.{_EXPERT_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 5 and parts[0] == "blk" and parts[2] in _PER_EXPERT_NAMES:
        return (f"model.layers.{parts[1]}.mlp.experts.{parts[3]}."
                f"{_PER_EXPERT_NAMES[parts[2]]}.{parts[4]}")
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
        if ".experts.<e>." in name:  # one [E, ...] tensor -> E HF tensors (views)
            for expert, part in enumerate(weight.unbind(0)):
                yield name.replace("<e>", str(expert)), part
            continue
        if name.endswith("shared_expert_gate.weight"):
            weight = weight.reshape(1, -1)
        yield name, weight


__all__ = ["GGUFFile", "gguf_weights", "hf_config_from_gguf", "hf_name"]
