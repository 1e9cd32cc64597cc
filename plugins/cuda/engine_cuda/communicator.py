"""NCCL collectives for the CUDA platform, over a torch.distributed group.

Rule: every collective is one native call on contiguous tensors (no emulation through
all_reduce as the gloo-safe base class does), so each costs what NCCL costs and can be
captured in a CUDA graph; small all-reduces on GPUs of one host take a one-shot
symmetric-memory kernel instead (`symm_allreduce.py`), chosen alike on every rank, and a
small all-reduce followed by the residual add and RMSNorm is one kernel
(`allreduce_norm.py`). `ENGINE_FUSED_ALLREDUCE_NORM=0` keeps those two steps apart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Optional

import torch

from engine_cuda.allreduce_norm import FusedAllReduceNorm
from engine_cuda.symm_allreduce import SymmAllReduce, _agree
from platforms.communicator import TorchDistributedCommunicator

logger = logging.getLogger(__name__)

FUSED_ENV = "ENGINE_FUSED_ALLREDUCE_NORM"  # "0": all-reduce, then add + norm, apart


class NcclCommunicator(TorchDistributedCommunicator):
    """`TorchDistributedCommunicator` with NCCL's reduce_scatter, all_gather into one tensor,
    and all_to_all_single, and a symmetric-memory all-reduce for small messages.

    Construction is collective over `group` when the group has 2..8 ranks (the fast path's
    setup agrees on every rank); `use_symm_mem=False` skips it and keeps NCCL for all."""

    def __init__(self, group: torch.distributed.ProcessGroup, use_symm_mem: bool = True) -> None:
        super().__init__(group)
        self.fast_all_reduce: Optional[SymmAllReduce] = None
        reason = "turned off by the caller"
        if use_symm_mem:
            device = torch.device("cuda", torch.cuda.current_device())
            self.fast_all_reduce, reason = SymmAllReduce.create(group, device)
        self.fused_norm: Optional[FusedAllReduceNorm] = None
        if self.fast_all_reduce is not None:
            self.all_reduce_path = (f"symmetric-memory one-shot up to "
                                    f"{self.fast_all_reduce.max_bytes // 1024} KiB, NCCL above")
            # Every rank reached here (the one-shot setup agreed); the variable must agree
            # too, since creation is collective: off on every rank if off on any.
            fused_on = _agree(os.environ.get(FUSED_ENV) != "0", group,
                              self.fast_all_reduce.device)
            if fused_on:
                self.fused_norm, why = FusedAllReduceNorm.create(
                    group, self.fast_all_reduce.device, self.fast_all_reduce.max_bytes)
                self.all_reduce_path += ("; all-reduce + residual + RMSNorm fused"
                                         if self.fused_norm else f"; no fused norm ({why})")
            else:
                self.all_reduce_path += f"; no fused norm ({FUSED_ENV}=0)"
        else:
            self.all_reduce_path = f"NCCL ({reason})"
        if self.world_size > 1:
            log = logger.info if self.rank == 0 else logger.debug
            log("all-reduce over %d ranks: %s", self.world_size, self.all_reduce_path)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_all_reduce
        if fast is not None and fast.can_reduce(x):
            return fast.all_reduce(x)
        return super().all_reduce(x)

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fused_norm
        if fused is not None and fused.can_fuse(x, residual, weight):
            return fused(x, residual, weight, eps)
        return add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def destroy(self) -> None:
        if self.fused_norm is not None:
            self.fused_norm.destroy()
            self.fused_norm = None
        if self.fast_all_reduce is not None:
            self.fast_all_reduce.destroy()
            self.fast_all_reduce = None

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
