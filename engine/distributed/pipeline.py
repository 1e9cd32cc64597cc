"""Pipeline parallelism: which layers a stage holds, how activations cross stages, and the
queue of micro-batches the engine core keeps in flight.

Rule: stage s of `pp` holds a contiguous range of decoder layers (earlier stages take one
more when the count does not divide); the first stage also embeds, the last also norms,
projects to logits and samples. Between stages, hidden states and the residual travel as
one [2, num_tokens, hidden] tensor over the PP group's communicator, each stage handling
batches in the order the executor sent them. The core keeps up to `pp` batches in flight
(`engine.engine_core.batch_queue`).

This module imports torch only inside the functions that move tensors; the split checks are
plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from engine.distributed.parallel_state import ParallelContext


# ---- layers per stage ---------------------------------------------------------------------

def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The decoder layers stage `pp_rank` holds: contiguous, sizes differing by at most one
    (earlier stages take the extra ones)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"Pipeline stage {pp_rank} is outside {pp_size} stages.")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def check_pipeline_parallel(num_layers: int, pp_size: int) -> list[str]:
    """Problems splitting `num_layers` decoder layers over `pp_size` stages (empty: fine)."""
    if pp_size < 1:
        return [f"--pipeline-parallel-size must be at least 1, got {pp_size}"]
    if num_layers < pp_size:
        return [f"num_hidden_layers ({num_layers}) is smaller than --pipeline-parallel-size "
                f"({pp_size}): every stage needs at least one layer"]
    return []


@dataclass(frozen=True)
class Stage:
    """This rank's place in the pipeline and the layers it holds."""

    rank: int = 0
    size: int = 1
    layers: range = range(0)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @staticmethod
    def of(ctx: ParallelContext, num_layers: int) -> Stage:
        return Stage(ctx.pp_rank, ctx.pp_size, stage_layers(num_layers, ctx.pp_size,
                                                            ctx.pp_rank))


# ---- activations between stages ---------------------------------------------------------

def send_activations(ctx: ParallelContext, hidden: torch.Tensor,
                     residual: torch.Tensor) -> None:
    """Send this stage's output (hidden, residual) to the next stage."""
    import torch

    assert ctx.pp_comm is not None and ctx.pp_rank < ctx.pp_size - 1
    ctx.pp_comm.send(torch.stack((hidden, residual)), dst=ctx.pp_rank + 1)


def recv_activations(ctx: ParallelContext, num_tokens: int, hidden_size: int,
                     dtype: torch.dtype, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive the previous stage's (hidden, residual) for `num_tokens` tokens."""
    import torch

    assert ctx.pp_comm is not None and ctx.pp_rank > 0
    buf = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
    ctx.pp_comm.recv(buf, src=ctx.pp_rank - 1)
    return buf[0], buf[1]
