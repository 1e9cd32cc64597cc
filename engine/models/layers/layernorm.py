"""RMSNorm, with the residual add fused in so the decoder keeps one residual stream; and
Gemma's RMSNorm, whose scale is (1 + weight).

Rule: the ops come from the current kernel table (`platforms.kernels`), looked up once when
the layer is built, so a platform can swap them; the reference normalises in float32 and
casts back to the input dtype, as HF does.

With tensor parallelism, a norm built with `partial_input=True` takes the branch output
(`x`, when a residual is given) as this rank's partial sum from a row-parallel layer built
with `reduce_output=False`, and sums it over the ranks itself: the communicator's
`all_reduce_add_rms_norm` does the all-reduce, the residual add and the norm in one pass
where the platform can (one kernel instead of two, and no separate all-reduce output).
The residual stream itself is always the full sum.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from engine.distributed import parallel_context
from platforms.kernels import kernel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, partial_input: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self._norm = kernel("rms_norm")
        self._add_norm = kernel("fused_add_rms_norm")
        ctx = parallel_context()
        # Whom to sum a partial input over (None: the input arrives whole).
        self.comm = ctx.tp_comm if partial_input and ctx.tp_size > 1 else None

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual), where
        x is first summed over the tensor-parallel ranks if the norm takes partial input."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        if self.comm is not None:
            return self.comm.all_reduce_add_rms_norm(x, residual, self.weight, self.eps,
                                                     self._add_norm)
        return self._add_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm (HF Gemma2RMSNorm/Gemma3RMSNorm): the checkpoint stores w and the
    scale is (1 + w); normalised and scaled in float32, rounded to the input dtype once at
    the end (the reference `rms_norm` on float32 inputs computes exactly that). With a
    residual the add is in the input dtype, as HF adds. Takes whole inputs only: the
    sandwich-norm decoder reduces its row-parallel outputs before any norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()  # w = 0 is the identity scale

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is not None:
            x = x + residual
            return self._scaled_norm(x), x
        return self._scaled_norm(x)

    def _scaled_norm(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()  # [H] float32
        return self._norm(x.float(), scale, self.eps).to(x.dtype)
