"""Mixtral: the Llama decoder whose every MLP is a sparse mixture of experts: softmax over
`num_local_experts` router logits, the top `num_experts_per_tok`, renormalised (HF's
MixtralTopKRouter). Checkpoints name the block `block_sparse_moe` with per-expert w1 (gate),
w3 (up), w2 (down); transformers v5 models hold them fused (`experts.gate_up_proj`,
`experts.down_proj`): both load (`ExpertWeights`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from engine.models.layers.moe import ExpertWeights, SparseMoeBlock
from engine.models.llama import DecoderOptions, LlamaForCausalLM
from platforms.kernels import MoERouting


def _mixtral_moe(config: Any, opts: DecoderOptions, layer_idx: int) -> Optional[nn.Module]:
    return SparseMoeBlock(
        config.hidden_size, config.num_local_experts, config.intermediate_size,
        MoERouting(top_k=config.num_experts_per_tok, renormalize=True),
        activation=config.hidden_act, reduce_output=opts.reduces_branches)


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return dataclasses.replace(DecoderOptions.llama(config), sparse_mlp=_mixtral_moe)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts = ExpertWeights(self)
        return super().load_weights(experts.filter(weights)) | experts.loaded
