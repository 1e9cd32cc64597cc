"""The attention layer every model uses: projections stay in the model, the paged-cache
work goes to the platform's backend.

Rule: the layer knows nothing of devices. A model declares what each layer needs (heads,
scale, a sliding window, a logits soft-cap); the model runner groups the layers by that
(KV-cache groups), builds one backend per group and binds each layer's `backend`, `kv_group`
and cache tensor (`kv_cache`) after sizing memory. The step's metadata arrives as a forward
argument, never through a global: the backend's own, or with several groups a
`GroupedAttentionMetadata` whose entry `kv_group` is this layer's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from engine.kv_cache.groups import KVCacheLayout, plan_kv_cache_layout
from platforms.interface import AttentionBackend, AttentionSpec, GroupedAttentionMetadata


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        layer_idx: int,
        sliding_window: Optional[int] = None,
        logits_soft_cap: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx  # the decoder layer it belongs to (its KV-cache group)
        self.sliding_window = sliding_window  # keys p - W + 1 .. p for a query at p
        self.logits_soft_cap = logits_soft_cap  # scores -> cap * tanh(scores / cap)
        # Bound by the model runner.
        self.backend: Optional[AttentionBackend] = None
        self.kv_group = 0
        self.kv_cache: Optional[torch.Tensor] = None

    def spec(self, dtype: torch.dtype, block_size: int) -> AttentionSpec:
        """What this layer needs of a backend (this rank's heads)."""
        return AttentionSpec(self.num_heads, self.num_kv_heads, self.head_dim, dtype,
                             block_size, sliding_window=self.sliding_window,
                             logits_soft_cap=self.logits_soft_cap)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        attn_metadata: Any,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        if self.kv_cache is None or self.backend is None:
            raise RuntimeError("Attention layer used before the model runner bound its KV cache.")
        if isinstance(attn_metadata, GroupedAttentionMetadata):
            attn_metadata = attn_metadata[self.kv_group]
        out = self.backend.forward(
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            attn_metadata,
            self.scale,
        )
        return out.view(-1, self.num_heads * self.head_dim)


def layer_sliding_windows(hf_config: Any) -> tuple[Optional[int], ...]:
    """Each layer's attention window from an HF config (None: full attention): transformers'
    `layer_types` ("sliding_attention" layers take `sliding_window`) where the config has
    it, else `sliding_window` on every layer unless `use_sliding_window` is False."""
    num_layers = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return (None,) * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if getattr(hf_config, "use_sliding_window", True) is False:
        return (None,) * num_layers
    return (int(window),) * num_layers


def kv_cache_layout(model_config: Any) -> KVCacheLayout:
    """The KV-cache groups of a resolved `ModelConfig` (the engine core and every worker
    plan the same, from the config, so pipeline stages agree on groups they do not hold)."""
    return plan_kv_cache_layout(layer_sliding_windows(model_config.hf_config),
                                model_config.max_model_len)
