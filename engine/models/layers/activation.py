"""Activation ops on merged projections.

Rule: the gate and up projections are one matmul; the activation splits its output in half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate then up) -> [..., d] = silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place on silu's fresh output: one buffer, not two
