"""NCCL collectives for the CUDA platform, over a torch.distributed group.

Rule: every collective is one native NCCL call on contiguous tensors (no emulation through
all_reduce as the gloo-safe base class does), so each costs what NCCL costs and can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from platforms.interface import TorchDistributedCommunicator


class NcclCommunicator(TorchDistributedCommunicator):
    """`TorchDistributedCommunicator` with NCCL's reduce_scatter, all_gather into one tensor,
    and all_to_all_single."""

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        x = x.contiguous()
        gathered = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        self._dist.all_gather_into_tensor(gathered, x, group=self.group)
        if dim % x.dim() == 0:
            return gathered.flatten(0, 1)  # rank order along dim 0: a free reshape
        return torch.cat(gathered.unbind(0), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} ({x.shape[dim]}) divisible by the group size "
                f"{self.world_size}."
            )
        rows_first = x.movedim(dim, 0).contiguous()  # NCCL splits the flat buffer in order
        out = torch.empty((rows_first.shape[0] // self.world_size, *rows_first.shape[1:]),
                          dtype=x.dtype, device=x.device)
        self._dist.reduce_scatter_tensor(out, rows_first, group=self.group)
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.world_size:
            raise ValueError(
                f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size "
                f"{self.world_size}."
            )
        x = x.contiguous()
        out = torch.empty_like(x)
        self._dist.all_to_all_single(out, x, group=self.group)
        return out
