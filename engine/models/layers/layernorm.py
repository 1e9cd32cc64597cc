"""RMSNorm, with the residual add fused in so the decoder keeps one residual stream.

Rule: the ops come from the current kernel table (`platforms.kernels`), looked up once when
the layer is built, so a platform can swap them; the reference normalises in float32 and
casts back to the input dtype, as HF does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from platforms.kernels import kernel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self._norm = kernel("rms_norm")
        self._add_norm = kernel("fused_add_rms_norm")

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)
