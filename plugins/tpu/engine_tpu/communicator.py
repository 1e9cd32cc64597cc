"""XLA collectives for the TPU platform, over a torch.distributed group of backend "xla".

Rule: import-guarded (torch_xla is imported when a communicator is built, never at
discovery); every collective is one native call of the xla process-group backend.
"""

from __future__ import annotations

import torch

from platforms.communicator import TorchDistributedCommunicator


class XlaCommunicator(TorchDistributedCommunicator):
    """`TorchDistributedCommunicator` with the xla backend's tensor collectives."""

    def __init__(self, group) -> None:
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers backend "xla")

        super().__init__(group)

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        self._dist.all_gather_into_tensor(out, x, group=self.group)
        if dim % x.dim() == 0:
            return out
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(f"reduce_scatter needs dim {dim} ({x.shape[dim]}) divisible by "
                             f"the group size {self.world_size}.")
        rows = x.movedim(dim, 0).contiguous()
        out = torch.empty((rows.shape[0] // self.world_size, *rows.shape[1:]), dtype=x.dtype,
                          device=x.device)
        self._dist.reduce_scatter_tensor(out, rows, group=self.group)
        return out.movedim(0, dim).contiguous()
