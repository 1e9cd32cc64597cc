"""Process groups of one engine: which rank is where, and the communicators of its groups.

Rule: nothing here is module-global. A worker creates its `ParallelGroups` once (one
`torch.distributed` world per engine, on a fresh TCP port) and destroys it on shutdown, so a
process can create and destroy engines one after another. Model layers read the current
`ParallelContext` (`use_parallel`) when they are built, like the kernel table, and keep it.

Rank layout (one engine): rank = (dp_rank * pp + pp_rank) * tp + tp_rank. Tensor-parallel
peers are neighbours (the fastest links on a host); the data-parallel axis is reserved in the
layout (each dp replica is its own engine today, so dp_rank is 0 inside one world).
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from platforms.interface import Communicator, Platform


@dataclass(frozen=True)
class RankLayout:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The rank whose step outputs the engine uses: the first rank of the last pipeline
        stage (the stage that samples)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"Rank {rank} is outside a world of {self.world_size}.")
        return divmod(rank, self.tensor_parallel_size)

    def tp_groups(self) -> list[list[int]]:
        tp = self.tensor_parallel_size
        return [list(range(s * tp, (s + 1) * tp)) for s in range(self.pipeline_parallel_size)]

    def pp_groups(self) -> list[list[int]]:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        return [[s * tp + t for s in range(pp)] for t in range(tp)]


@dataclass(frozen=True)
class ParallelContext:
    """What a layer needs to know about its rank: position and the communicators."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_comm: Optional[Communicator] = None
    pp_rank: int = 0
    pp_size: int = 1
    pp_comm: Optional[Communicator] = None
    # MoE layers hold whole experts, split over the tensor-parallel group (its ranks are
    # the expert-parallel ranks), instead of slices of every expert.
    expert_parallel: bool = False


SINGLE = ParallelContext()

_current: contextvars.ContextVar[ParallelContext] = contextvars.ContextVar(
    "engine_parallel_context", default=SINGLE
)


@contextlib.contextmanager
def use_parallel(context: ParallelContext) -> Iterator[ParallelContext]:
    """Make `context` current while a model is built inside the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def parallel_context() -> ParallelContext:
    """The current context (call at layer construction, never per step)."""
    return _current.get()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the OS picks it), for one engine's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ParallelGroups:
    """The torch.distributed world of one engine, seen from one rank, and its groups.

    Every rank builds every group in the same order (torch.distributed requires it) but
    keeps the communicator of the groups it belongs to only.
    """

    def __init__(self, platform: Platform, layout: RankLayout, rank: int,
                 init_method: str, timeout_s: float = 300.0,
                 expert_parallel: bool = False) -> None:
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; one worker "
                "process hosts one rank of one engine (shut the previous engine down first)."
            )
        self.layout, self.rank = layout, rank
        dist.init_process_group(
            backend=platform.capabilities.distributed_backend, init_method=init_method, rank=rank,
            world_size=layout.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        )
        pp_rank, tp_rank = layout.coords(rank)
        self.tp_comm = self._join(platform, layout.tp_groups())
        self.pp_comm = self._join(platform, layout.pp_groups())
        self.context = ParallelContext(
            tp_rank=tp_rank, tp_size=layout.tensor_parallel_size, tp_comm=self.tp_comm,
            pp_rank=pp_rank, pp_size=layout.pipeline_parallel_size, pp_comm=self.pp_comm,
            expert_parallel=expert_parallel,
        )

    def _join(self, platform: Platform, groups: list[list[int]]) -> Communicator:
        import torch.distributed as dist

        mine: Optional[Communicator] = None
        for ranks in groups:
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if self.rank in ranks:
                mine = platform.communicator(group)
        assert mine is not None  # the layout covers every rank
        return mine

    def destroy(self) -> None:
        import torch.distributed as dist

        for comm in (self.tp_comm, self.pp_comm):
            comm.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
