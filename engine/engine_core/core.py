"""The engine core: scheduler + executor, stepped as `schedule -> execute -> update`.

Rule: the step fits on one screen and has no phases. Everything about *which* tokens run
lives in the scheduler, everything about *how* they run lives behind the executor. Startup
is a timed checklist: select platform -> load -> size KV cache -> warm up.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from engine.config import EngineConfig
from engine.engine_core.messages import EngineCoreOutputs, EngineCoreRequest
from engine.executor.uniproc import UniprocExecutor
from engine.models.loader import checkpoint_dtype
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.scheduler import Scheduler
from platforms.registry import select_platform

logger = logging.getLogger(__name__)


def resolve_for_platform(config: EngineConfig, platform) -> EngineConfig:
    """Fill what the platform decides (dtype for "auto"), then validate; never mutates."""
    model = config.model
    if model.dtype is None:
        model = dataclasses.replace(model, dtype=platform.resolve_dtype(checkpoint_dtype(model)))
        config = dataclasses.replace(config, model=model)
    problems = platform.validate(config)
    if problems:
        raise ValueError("Configuration problems on " + platform.name + ":\n  " +
                         "\n  ".join(problems))
    return config


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.platform = select_platform(config.device)
        self.config = config = resolve_for_platform(config, self.platform)
        self.executor = UniprocExecutor(config, self.platform)
        self.executor.load_model()
        timings["load"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        timings["kv_cache"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.executor.warm_up()
        timings["warmup"] = time.perf_counter() - t2

        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)
        self.startup_timings = timings
        block_size = config.cache.block_size
        max_concurrency = num_blocks * block_size / config.scheduler.max_model_len
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens); max concurrency at %d tokens per "
            "request: %.1fx", num_blocks, block_size, num_blocks * block_size,
            config.scheduler.max_model_len, max_concurrency,
        )

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_engine_core_request(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """One engine step. There is no prefill or decode phase: the scheduler decides how
        many tokens each request advances, the executor runs them in one batch."""
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs.timestamp = time.time()  # wall clock, like arrival_time
        return outputs

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
