"""Gemma 2: the Llama decoder with Gemma's norms ((1 + w), float32, a norm after each branch
as well as before it), a gelu-tanh MLP, embeddings scaled by sqrt(hidden_size), the softmax
scale query_pre_attn_scalar ** -0.5, and tanh soft-caps on attention scores and on the
output logits. Sliding and full layers alternate (the config's `layer_types`).
"""

from __future__ import annotations

from typing import Any, Optional

from engine.models.llama import DecoderOptions, LlamaForCausalLM


def gemma_options(config: Any, *, qk_norm: bool, attn_logits_soft_cap: Optional[float],
                  rope_per_layer_type: bool) -> DecoderOptions:
    """The decoder options Gemma 2 and 3 share; ValueError for what they do not implement."""
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{config.model_type} with use_bidirectional_attention=True (an "
                         "embedding model such as EmbeddingGemma) is not supported: this "
                         "engine serves causal language models only.")
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderOptions(
        qkv_bias=bias, o_bias=bias, qk_norm=qk_norm, gemma_norms=True, sandwich_norms=True,
        activation=getattr(config, "hidden_activation", None) or config.hidden_act,
        embed_scale=config.hidden_size**0.5,
        attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
        attn_logits_soft_cap=attn_logits_soft_cap,
        final_logits_soft_cap=getattr(config, "final_logit_softcapping", None),
        rope_per_layer_type=rope_per_layer_type,
    )


class Gemma2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return gemma_options(config, qk_norm=False,
                             attn_logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
                             rope_per_layer_type=False)
