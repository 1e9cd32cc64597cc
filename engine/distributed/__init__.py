"""Tensor/pipeline-parallel state of one engine: rank layout, groups, layer context."""

from engine.distributed.parallel_state import (
    SINGLE,
    ParallelContext,
    ParallelGroups,
    RankLayout,
    free_port,
    parallel_context,
    use_parallel,
)

__all__ = ["SINGLE", "ParallelContext", "ParallelGroups", "RankLayout", "free_port",
           "parallel_context", "use_parallel"]
