"""Qwen3-MoE: the Qwen3 decoder (per-head q/k norm) with Qwen2-MoE's sparse layers and no
shared expert; `norm_topk_prob` (True in the released models) renormalises the top-k."""

from __future__ import annotations

from typing import Any

from engine.models.llama import DecoderOptions
from engine.models.qwen2_moe import Qwen2MoeForCausalLM, qwen_moe_block


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm=True,
                              sparse_mlp=qwen_moe_block)
