"""Phi-3: the Llama decoder; its checkpoint stores q/k/v as one `qkv_proj` and gate/up as
one `gate_up_proj`, in the order our merged layers keep them, so they load whole (each
rank still takes its slice of each projection: `MergedColumnParallelLinear.load_full`).
LongRoPE ("longrope", older "su") is the rotary layer's; a `sliding_window` applies to every
layer.
"""

from __future__ import annotations

from typing import Any

from engine.models.llama import DecoderOptions, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        params = getattr(config, "rope_parameters", None) or {}
        partial = params.get("partial_rotary_factor",
                             getattr(config, "partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"Phi3ForCausalLM with partial_rotary_factor={partial} (rotary "
                             "over part of each head, e.g. Phi-4-mini) is not supported yet.")
        return DecoderOptions(activation=getattr(config, "hidden_act", "silu"))
