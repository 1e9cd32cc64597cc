"""Linear layers whose weights arrive by HF name, possibly as several shards of one matmul.

Rule: parameters are allocated uninitialised (`torch.empty`): a loader always fills them,
so random init would only cost startup time. A merged layer (q/k/v or gate/up) is one
matmul over concatenated output rows; `load_shard` copies one HF tensor into its rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W.T (+ b), W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias: Optional[nn.Parameter] = (
            nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output rows."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        """Copy HF tensor `tensor` (weight or bias of projection `shard`) into its rows."""
        start, size = self.offsets[shard], self.output_sizes[shard]
        target = param.data.narrow(0, start, size)
        if tensor.shape != target.shape:
            raise ValueError(
                f"Shard {shard} of a merged projection has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}; the checkpoint does not match the config."
            )
        target.copy_(tensor)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., sum(output_sizes)] -> one view per projection."""
        return y.split(self.output_sizes, dim=-1)


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden]; also the tied LM head's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim),
                                   requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
