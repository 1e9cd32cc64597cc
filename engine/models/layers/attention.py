"""The attention layer every model uses: projections stay in the model, the paged-cache
work goes to the platform's backend.

Rule: the layer knows nothing of devices. The model runner binds each layer's cache tensor
(`kv_cache`) after sizing memory; the step's metadata arrives as a forward argument, never
through a global.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from platforms.interface import AttentionBackend


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.kv_cache: Optional[torch.Tensor] = None  # bound by the model runner

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        attn_metadata: Any,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        if self.kv_cache is None:
            raise RuntimeError("Attention layer used before the model runner bound its KV cache.")
        out = self.backend.forward(
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            attn_metadata,
            self.scale,
        )
        return out.view(-1, self.num_heads * self.head_dim)
