"""The default communicator: collectives over a `torch.distributed` group.

Rule: a helper for `platforms.interface.Communicator`, not part of the contract; most
platforms use it as it is (naming only their backend in `Capabilities.distributed_backend`)
or subclass it for their native collectives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from platforms.interface import Communicator

if TYPE_CHECKING:
    import torch.distributed


class TorchDistributedCommunicator(Communicator):
    """A communicator over a `torch.distributed` group (gloo, nccl, or any backend torch
    knows): enough for most platforms, which then only name their backend."""

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        self._dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} ({x.shape[dim]}) divisible by the group size "
                f"{self.world_size}."
            )
        # Sum everywhere, keep this rank's slice: correct on every backend, gloo included
        # (which has no reduce_scatter); platforms with a native one override this.
        total = self.all_reduce(x)
        return total.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(x, src=self._global[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        self._dist.send(x.contiguous(), dst=self._global[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self._dist.recv(x, src=self._global[src], group=self.group)
        return x

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.world_size:
            raise ValueError(
                f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size "
                f"{self.world_size}."
            )
        chunks = [c.contiguous() for c in x.chunk(self.world_size, dim=0)]
        try:
            out = [torch.empty_like(c) for c in chunks]
            self._dist.all_to_all(out, chunks, group=self.group)
        except RuntimeError:
            # gloo has no all_to_all: every rank broadcasts its chunks in turn.
            out = []
            for j in range(self.world_size):
                mine = self.all_gather(chunks[j].unsqueeze(0), dim=0)  # chunk j of every rank
                if j == self.rank:
                    out = list(mine.unbind(0))
        return torch.cat(out, dim=0)

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)
