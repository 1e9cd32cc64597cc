"""Executors run the workers; `make_executor` picks one from the parallel config."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.executor.abstract import Executor
from platforms.interface import Platform


def make_executor(config: EngineConfig, platform: Platform) -> Executor:
    """`uniproc` for one device in this process, `mp` for one process per device on this
    host, `ray` for one Ray actor per device on a Ray cluster."""
    parallel = config.parallel
    backend = parallel.distributed_executor_backend
    if backend == "uniproc":
        if parallel.world_size > 1:
            raise ValueError(
                f"--distributed-executor-backend uniproc runs one device, but "
                f"tensor_parallel_size x pipeline_parallel_size = {parallel.world_size}; "
                "use 'mp' (the default then)."
            )
        from engine.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config, platform)
    if backend == "mp":
        from engine.executor.mp import MultiprocExecutor

        return MultiprocExecutor(config, platform)
    if backend == "ray":
        from engine.executor.ray import RayExecutor

        return RayExecutor(config, platform)
    raise ValueError(
        f"--distributed-executor-backend {backend!r} is not available yet; use 'mp' "
        "(one host) or 'uniproc'."
    )


__all__ = ["Executor", "make_executor"]
