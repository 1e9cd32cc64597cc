"""Gemma 3 (text): Gemma 2's decoder with a Gemma RMSNorm over each head of q and k before
rotary, no attention soft-cap (transformers' Gemma 3 attention never applies
`attn_logit_softcapping`, so neither does this), and two rope settings: sliding layers use
`rope_local_base_freq` and full layers `rope_theta` with the config's scaling
(transformers 5: `rope_parameters` per layer type). The multimodal
Gemma3ForConditionalGeneration is refused by the registry (text-only).
"""

from __future__ import annotations

from typing import Any

from engine.models.gemma2 import gemma_options
from engine.models.llama import DecoderOptions, LlamaForCausalLM


class Gemma3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return gemma_options(config, qk_norm=True, attn_logits_soft_cap=None,
                             rope_per_layer_type=True)
