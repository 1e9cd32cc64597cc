"""Activation ops on merged projections.

Rule: the gate and up projections are one matmul; the activation splits its output in half.
The op comes from the current kernel table, so a platform can swap it.
"""

from __future__ import annotations

import torch
from torch import nn

from platforms.kernels import kernel


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> [..., d] = silu(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self._op = kernel("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x)
