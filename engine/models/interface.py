"""What a model class must offer the model runner.

Rule: a model is a plain `nn.Module` built from an HF config; the model runner binds its
`Attention` layers to the platform's backends. It sees flattened tokens (no batch dimension, no padding), computes logits only
for the rows the runner asks for, and loads weights by their HF names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch


class CausalLM(Protocol):
    def __init__(self, config: Any) -> None: ...

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        attn_metadata: Any,
    ) -> torch.Tensor:  # hidden states [num_tokens, hidden_size]
        ...

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] in float32."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Take (HF name, tensor) pairs; return the parameter names that were loaded."""
        ...
