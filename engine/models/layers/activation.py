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


class GeluTanhAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> [..., d] = gelu_tanh(gate) * up (Gemma's MLP, HF
    `gelu_pytorch_tanh`)."""

    def __init__(self) -> None:
        super().__init__()
        self._op = kernel("gelu_tanh_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x)


# HF `hidden_act` / `hidden_activation` -> the gated activation that implements it.
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
}


def gated_activation(name: str) -> nn.Module:
    """The gated activation for an HF activation name, or ValueError naming the known ones."""
    if name not in GATED_ACTIVATIONS:
        raise ValueError(f"Activation {name!r} is not supported (supported: "
                         f"{', '.join(GATED_ACTIVATIONS)}); the model's config.json sets it.")
    return GATED_ACTIVATIONS[name]()
