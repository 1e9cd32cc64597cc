"""Qwen2-MoE: the Qwen2 decoder (q/k/v biases) whose sparse layers' MLP is a mixture of
experts: softmax over `num_experts` router logits, the top `num_experts_per_tok`,
renormalised only with `norm_topk_prob`, plus a shared expert MLP scaled by a sigmoid
gate. A layer is sparse unless it is in `mlp_only_layers` or (index + 1) is not a multiple
of `decoder_sparse_step`; the others keep the dense MLP of `intermediate_size`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from engine.models.layers.moe import ExpertWeights, SparseMoeBlock
from engine.models.llama import DecoderOptions, LlamaForCausalLM
from platforms.kernels import MoERouting


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """HF's rule for Qwen2-MoE and Qwen3-MoE decoder layers."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % step == 0)


def qwen_moe_block(config: Any, opts: DecoderOptions, layer_idx: int) -> Optional[nn.Module]:
    """Layer `layer_idx`'s MoE block, None for a dense layer; a shared expert where the
    config sizes one (Qwen2-MoE)."""
    if not is_sparse_layer(config, layer_idx):
        return None
    return SparseMoeBlock(
        config.hidden_size, config.num_experts, config.moe_intermediate_size,
        MoERouting(top_k=config.num_experts_per_tok,
                   renormalize=bool(getattr(config, "norm_topk_prob", False))),
        activation=config.hidden_act,
        shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", None),
        reduce_output=opts.reduces_branches)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return DecoderOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False,
                              sparse_mlp=qwen_moe_block)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts = ExpertWeights(self)
        return super().load_weights(experts.filter(weights)) | experts.loaded
