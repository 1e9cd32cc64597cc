"""The Llama decoder, shared by every Llama-shaped model (Llama 2/3/3.1, Mistral, SmolLM2,
DeepSeek-R1-Distill-Llama) and, through `DecoderOptions`, by Qwen2, Qwen3, Phi-3, Gemma 2
and Gemma 3, and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE.

Rule: a variant is a set of options on this one decoder (qkv bias, per-head q/k norm, Gemma's
norms and soft-caps, a sparse MLP per layer), never a copy of it. Tokens are flattened ([T], no batch dimension); the paged cache work is the
`Attention` layer's. Compute runs in the model dtype; logits come out in float32.

With tensor parallelism the two row-parallel projections of a layer (o_proj, down_proj)
return this rank's partial sums, and the norm after each (the next post-attention or input
norm, or the final norm) sums them over the ranks fused with its residual add. So the
residual stream is always whole and a branch output is partial; the hidden state a pipeline
stage hands on is partial too (each TP rank sends its own to the same rank of the next
stage, whose first norm sums it). Gemma's sandwich norms normalise a branch output before
it joins the residual, so there the projections sum over the ranks themselves and every
norm takes whole inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from engine.distributed import parallel_context
from engine.distributed.pipeline import Stage
from engine.models.layers.activation import gated_activation
from engine.models.layers.attention import Attention, layer_sliding_windows
from engine.models.layers.layernorm import GemmaRMSNorm, RMSNorm
from engine.models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.models.layers.rotary import RotaryEmbedding, rope_settings

# HF projection name -> (our merged parameter, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Checkpoint entries that are recomputed here rather than loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class DecoderOptions:
    """What differs between Llama-shaped families."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    gemma_norms: bool = False  # every norm scales by (1 + w), in float32 (GemmaRMSNorm)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after each branch too (SandwichDecoderLayer)
    activation: str = "silu"  # the MLP's gate activation (an HF name)
    embed_scale: Optional[float] = None  # embeddings times this (Gemma: sqrt(hidden_size))
    attn_scale: Optional[float] = None  # softmax scale; None: head_dim ** -0.5
    attn_logits_soft_cap: Optional[float] = None  # scores -> cap * tanh(scores / cap)
    final_logits_soft_cap: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    rope_per_layer_type: bool = False  # Gemma 3: rope_parameters per layer type
    # Mixture of experts (Mixtral, Qwen-MoE): (config, options, layer index) -> that layer's
    # MoE block, or None where the layer keeps the dense LlamaMLP. None: every layer dense.
    sparse_mlp: Optional[Callable[[Any, DecoderOptions, int], Optional[nn.Module]]] = None

    @property
    def reduces_branches(self) -> bool:
        """Whether o_proj and down_proj sum over the TP ranks themselves: Gemma's norms do
        no fused all-reduce, and a sandwich norm needs the whole branch output."""
        return self.gemma_norms or self.sandwich_norms

    def mlp(self, config: Any, layer_idx: int) -> nn.Module:
        """Layer `layer_idx`'s MLP: the sparse one the options choose, else LlamaMLP."""
        sparse = None if self.sparse_mlp is None else self.sparse_mlp(config, self, layer_idx)
        return LlamaMLP(config, self) if sparse is None else sparse

    def norm(self, size: int, eps: float, partial_input: bool = False) -> RMSNorm:
        if self.gemma_norms:
            return GemmaRMSNorm(size, eps)
        return RMSNorm(size, eps, partial_input=partial_input and not self.reduces_branches)

    @staticmethod
    def llama(config: Any) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, opts: DecoderOptions, rotary_emb: RotaryEmbedding,
                 layer_idx: int) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads,
                                          num_kv_heads, bias=opts.qkv_bias)
        # This rank's heads (all of them with one rank).
        self.num_heads = self.qkv_proj.heads.num_heads
        self.num_kv_heads = self.qkv_proj.heads.num_kv_heads
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
                                        bias=opts.o_bias,
                                        reduce_output=opts.reduces_branches)
        eps = config.rms_norm_eps
        self.q_norm = opts.norm(self.head_dim, eps) if opts.qk_norm else None
        self.k_norm = opts.norm(self.head_dim, eps) if opts.qk_norm else None
        self.rotary_emb = rotary_emb  # shared by the layers of one rope setting: one cache
        scale = self.head_dim**-0.5 if opts.attn_scale is None else opts.attn_scale
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale,
                              layer_idx=layer_idx,
                              sliding_window=layer_sliding_windows(config)[layer_idx],
                              logits_soft_cap=opts.attn_logits_soft_cap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: Any
                ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.flatten(1), k.flatten(1), v.contiguous(), attn_metadata)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, opts: DecoderOptions) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size],
                                                       bias=bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias,
                                           reduce_output=opts.reduces_branches)
        self.act = gated_activation(opts.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, opts: DecoderOptions, rotary_emb: RotaryEmbedding,
                 layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, opts, rotary_emb, layer_idx)
        self.mlp = opts.mlp(config, layer_idx)
        # Both take a partial branch output (the row-parallel projections do not reduce).
        self.input_layernorm = opts.norm(config.hidden_size, config.rms_norm_eps,
                                         partial_input=True)
        self.post_attention_layernorm = opts.norm(config.hidden_size, config.rms_norm_eps,
                                                  partial_input=True)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], attn_metadata: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class SandwichDecoderLayer(LlamaDecoderLayer):
    """Gemma 2/3: each branch is normalised after as well as before, then joins the residual:
    h += post_attention_norm(attn(input_norm(h))); h += post_feedforward_norm(mlp(
    pre_feedforward_norm(h))). The sum is left to the next norm, as in the Llama layer."""

    def __init__(self, config: Any, opts: DecoderOptions, rotary_emb: RotaryEmbedding,
                 layer_idx: int) -> None:
        super().__init__(config, opts, rotary_emb, layer_idx)
        self.pre_feedforward_layernorm = opts.norm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = opts.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], attn_metadata: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, attn_metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


def _rotary_embeddings(config: Any, opts: DecoderOptions) -> list[RotaryEmbedding]:
    """Each layer's rotary embedding: one for all layers, or (Gemma 3) one per layer type,
    shared by the layers of that type."""
    size, max_position = head_dim_of(config), config.max_position_embeddings
    if not opts.rope_per_layer_type:
        return [RotaryEmbedding(size, max_position, *rope_settings(config))
                ] * config.num_hidden_layers
    by_type: dict[str, RotaryEmbedding] = {}
    for layer_type in config.layer_types:
        if layer_type not in by_type:
            by_type[layer_type] = RotaryEmbedding(size, max_position,
                                                  *rope_settings(config, layer_type))
    return [by_type[t] for t in config.layer_types]


@functools.cache
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (HF scales embeddings by a tensor of the model dtype)."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


class LlamaModel(nn.Module):
    """The decoder stack, or one pipeline stage of it: layers outside the stage are empty
    placeholders (never built or loaded, their indices kept so HF names still match), the
    embedding lives on the first stage (and on the last when the head is tied to it), the
    final norm on the last."""

    def __init__(self, config: Any, opts: DecoderOptions) -> None:
        super().__init__()
        self.stage = Stage.of(parallel_context(), config.num_hidden_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_tokens: Optional[VocabParallelEmbedding] = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            if self.stage.is_first or (self.stage.is_last and tied) else None
        )
        self.embed_scale = opts.embed_scale
        rotary = _rotary_embeddings(config, opts)
        layer_cls = SandwichDecoderLayer if opts.sandwich_norms else LlamaDecoderLayer
        self.layers = nn.ModuleList(
            layer_cls(config, opts, rotary[i], i)
            if i in self.stage.layers else nn.Identity()
            for i in range(config.num_hidden_layers)
        )
        self.norm = (opts.norm(config.hidden_size, config.rms_norm_eps, partial_input=True)
                     if self.stage.is_last else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Hidden states after the final norm on the last stage; (hidden, residual) for the
        next stage on the others. A stage after the first takes the previous one's output
        as `intermediate` instead of embedding `input_ids`."""
        if self.stage.is_first:
            assert self.embed_tokens is not None
            hidden, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                hidden = hidden * _in_dtype(self.embed_scale, hidden.dtype)
        else:
            assert intermediate is not None, "a later pipeline stage needs its input"
            hidden, residual = intermediate
        for i in self.stage.layers:
            hidden, residual = self.layers[i](positions, hidden, residual, attn_metadata)
        if self.norm is None:
            assert residual is not None
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-shaped causal LM; subclasses only choose `DecoderOptions`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        opts = self.decoder_options(config)
        self.model = LlamaModel(config, opts)
        self.final_logits_soft_cap = opts.final_logits_soft_cap
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        # The head lives on the last pipeline stage only (every stage with one).
        self.lm_head: Optional[VocabParallelEmbedding] = (
            None if self.tie_word_embeddings or not self.model.stage.is_last
            else VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        )

    @classmethod
    def decoder_options(cls, config: Any) -> DecoderOptions:
        return DecoderOptions.llama(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any,
                intermediate: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        assert head is not None, "logits are computed on the last pipeline stage only"
        logits = head.logits(hidden_states).float()
        cap = self.final_logits_soft_cap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (HF name, tensor) pairs in; a merged parameter counts as loaded only once
        all its shards (q, k and v; gate and up) have arrived."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[int]] = {}
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and self.lm_head is None:
                continue  # tied (the embedding table is the head) or not the last stage
            if not self._on_this_stage(hf_name):
                continue  # another pipeline stage holds it
            name, shard = _our_name(hf_name)
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"Checkpoint tensor {hf_name!r} has no parameter in "
                    f"{type(self).__name__}; the weights do not match the config's architecture."
                )
            if shard is None:
                _copy_checked(param, tensor, hf_name)
            else:
                module = self.get_submodule(name.rsplit(".", 1)[0])
                module.load_shard(param, tensor, shard)
                shards_seen.setdefault(name, set()).add(shard)
                if len(shards_seen[name]) < len(module.output_sizes):
                    continue
            loaded.add(name)
        return loaded

    def _on_this_stage(self, hf_name: str) -> bool:
        """Whether this rank's pipeline stage holds the checkpoint tensor `hf_name`."""
        if hf_name.startswith("model.layers."):
            return int(hf_name.split(".")[2]) in self.model.stage.layers
        if hf_name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if hf_name.startswith("model.norm."):
            return self.model.norm is not None
        return True


def _our_name(hf_name: str) -> tuple[str, Optional[int]]:
    """HF parameter name -> (our parameter name, shard index or None)."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part in _STACKED:
            merged, shard = _STACKED[part]
            return ".".join(parts[:i] + [merged] + parts[i + 1:]), shard
    return hf_name, None


def _copy_checked(param: nn.Parameter, tensor: torch.Tensor, hf_name: str) -> None:
    load_full = getattr(param, "load_full", None)
    if load_full is not None:  # a split layer: it copies this rank's slice
        try:
            load_full(tensor)
        except ValueError as e:
            raise ValueError(f"Checkpoint tensor {hf_name!r}: {e}") from None
        return
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(
            f"Checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model "
            f"expects {tuple(param.shape)}; the weights do not match the config."
        )
    param.data.copy_(tensor)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral checkpoints are Llama-shaped; v0.1's sliding window is each layer's window."""
