"""The engine core: scheduler + executor, stepped as `schedule -> execute -> update`.

Rule: the step fits on one screen and has no phases. Everything about *which* tokens run
lives in the scheduler, everything about *how* they run lives behind the executor. Startup
is a timed checklist: select platform -> load -> size KV cache -> warm up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Optional

import torch

from engine.config import EngineConfig
from engine.engine_core.batch_queue import BatchQueue, worth_dispatching
from engine.executor import make_executor
from engine.kv_cache.groups import KVCacheLayout
from engine.messages.core import EngineCoreOutputs, EngineCoreRequest
from engine.models.layers.attention import kv_cache_layout
from engine.models.loader import checkpoint_dtype
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.scheduler import Scheduler
from engine.structured_outputs.manager import StructuredOutputManager
from platforms.registry import select_platform
from platforms.scheduling import StaticBatching

logger = logging.getLogger(__name__)

# How often, at most, the core asks the workers for the expert load while busy (each ask
# syncs every rank's device once).
EXPERT_LOAD_INTERVAL_S = 1.0


def resolve_for_platform(config: EngineConfig, platform) -> EngineConfig:
    """Fill what the platform decides (dtype for "auto", max_num_seqs left unset), then
    validate; never mutates."""
    model = config.model
    if model.dtype is None:
        model = dataclasses.replace(model, dtype=platform.resolve_dtype(checkpoint_dtype(model)))
        config = dataclasses.replace(config, model=model)
    if config.scheduler.max_num_seqs is None:
        config = dataclasses.replace(config, scheduler=dataclasses.replace(
            config.scheduler, max_num_seqs=platform.capabilities.default_max_num_seqs))
    problems = platform.validate(config.for_platform())
    if problems:
        raise ValueError("Configuration problems on " + platform.name + ":\n  " +
                         "\n  ".join(problems))
    return config


def kv_cache_summary(config: EngineConfig, num_blocks: int,
                     layout: Optional[KVCacheLayout] = None) -> str:
    """"KV cache: 12345 blocks (20.1 GiB); 24.1x concurrency at max_model_len 8192": GiB of
    keys and values over all workers; concurrency = how many requests of max_model_len
    tokens the blocks hold at once (a window group holds only its window's blocks).
    `layout`: the model's KV-cache groups (None: one group of every layer)."""
    model, block_size = config.model, config.cache.block_size
    num_slots = model.num_layers if layout is None else layout.num_slots
    windows = (None,) if layout is None else layout.windows
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    block_bytes = 2 * block_size * num_slots * model.num_kv_heads * model.head_dim * itemsize
    max_model_len = config.scheduler.max_model_len
    full = -(-max_model_len // block_size)
    per_request = sum(full if w is None else min(full, -(-(w - 1) // block_size) + 1)
                      for w in windows)
    return (f"KV cache: {num_blocks} blocks ({num_blocks * block_bytes / 2**30:.1f} GiB); "
            f"{num_blocks / per_request:.1f}x concurrency at max_model_len "
            f"{max_model_len}")


def use_async_scheduling(config: EngineConfig, platform, executor,
                         constraints: Optional[StaticBatching]) -> bool:
    """--async-scheduling as asked, or by default where the platform queues its work; an
    explicit request that cannot be met is an error naming why."""
    reasons = []
    if not executor.supports_async_scheduling:
        reasons.append(f"the {config.parallel.distributed_executor_backend!r} executor with "
                       f"pipeline_parallel_size {config.parallel.pipeline_parallel_size} "
                       "answers a step only when it is done")
    if constraints is not None:
        reasons.append(f"{platform.name} runs static batches")
    asked = config.scheduler.async_scheduling
    if asked and reasons:
        raise ValueError("--async-scheduling is not possible here: " + "; ".join(reasons) +
                         ". Drop the flag.")
    if asked is None:
        return not reasons and platform.capabilities.executes_asynchronously
    return asked


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.platform = select_platform(config.device)
        self.config = config = resolve_for_platform(config, self.platform)
        self.executor = make_executor(config, self.platform)
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
        depth = self.executor.max_concurrent_batches
        constraints = self.platform.scheduling_constraints(config.for_platform())
        self.async_scheduling = use_async_scheduling(config, self.platform, self.executor,
                                                     constraints)
        # Structured outputs: grammars compile off the step loop; a request waits here for
        # its own grammar only, then joins the scheduler with its matcher.
        self.structured = StructuredOutputManager(config.model,
                                                  config.structured_outputs_backend,
                                                  config.reasoning_parser)
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, constraints,
                                   num_micro_batches=depth,
                                   async_scheduling=self.async_scheduling,
                                   bitmask=self.structured.bitmask,
                                   defer_bitmask=self.executor.supports_deferred_bitmask,
                                   kv_cache_windows=kv_cache_layout(config.model).windows,
                                   max_loras=None if config.lora is None
                                   else config.lora.max_loras)
        if self.async_scheduling:
            depth = 2  # step N+1 is scheduled and launched while step N runs
        # Batches in flight, scheduled ahead (None: one at a time).
        self.batch_queue = BatchQueue(depth) if depth > 1 else None
        self.startup_timings = timings
        self._profiling = False
        # Expert load (expert-parallel MoE): when it was last taken, and whether tokens ran
        # since.
        self._counts_expert_load = config.parallel.enable_expert_parallel
        self._last_expert_load = time.monotonic()
        self._expert_load_pending = False
        logger.info("%s", kv_cache_summary(config, num_blocks, kv_cache_layout(config.model)))
        logger.info("async scheduling: %s", "on (step N+1 is scheduled while step N runs)"
                    if self.async_scheduling else "off")

    def add_request(self, request: EngineCoreRequest) -> None:
        req = Request.from_engine_core_request(request)
        constraint = req.sampling_params.structured_outputs
        if constraint is None:
            self.scheduler.add_request(req)
            return
        self._compiling[req.request_id] = (
            req, self.structured.submit(constraint, req.prompt_token_ids))

    def abort_requests(self, request_ids: list[str]) -> None:
        for req_id in request_ids:
            self._compiling.pop(req_id, None)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self.batch_queue)
                or bool(self._compiling))

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar is ready to the scheduler (a grammar that did not
        compile fails its request only). With nothing else to do, wait for one briefly."""
        if not self.scheduler.has_unfinished_requests() and not self.batch_queue:
            concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for req_id, (req, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[req_id]
            error: Any = future.exception()
            if error is None:
                req.grammar = future.result()
            self.scheduler.add_request(req)
            if error is not None:
                self.scheduler.fail_request(req_id, f"structured_outputs: {error}",
                                            param="structured_outputs")

    def step(self) -> EngineCoreOutputs:
        """One engine step. There is no prefill or decode phase: the scheduler decides how
        many tokens each request advances, the executor runs them in one batch."""
        if self._compiling:
            self._admit_compiled()
        if self.batch_queue is not None:
            return self._step_pipelined(self.batch_queue)
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        self._attach_expert_load(outputs)
        outputs.timestamp = time.time()  # wall clock, like arrival_time
        return outputs

    def _step_pipelined(self, queue: BatchQueue) -> EngineCoreOutputs:
        """Fill the queue (schedule and dispatch until `depth` batches are in flight or
        nothing more can run), then wait for the oldest batch and apply its output. Used
        for pipeline stages (one batch per stage) and for async scheduling (step N+1 is
        launched before step N's output is applied, so the device never waits for us)."""
        self._fill(queue)
        self._give_deferred_bitmasks(queue, oldest_only=True)
        outputs = self.scheduler.update_from_output(*queue.pop())
        # The newer batch's forward pass runs on the device meanwhile; its grammar rows
        # needed the tokens just applied. Once it samples, the device has nothing queued
        # after it: launch the next step now, before these outputs go to the client.
        if self._give_deferred_bitmasks(queue):
            self._fill(queue)
        self._attach_expert_load(outputs)
        outputs.timestamp = time.time()  # wall clock, like arrival_time
        return outputs

    def _attach_expert_load(self, outputs: EngineCoreOutputs) -> None:
        """Put the token-slots per expert since the last report into the stats: at most
        once per EXPERT_LOAD_INTERVAL_S while busy, and once more when the engine goes
        idle, so a finished run's counts are complete. Never per step (a host sync)."""
        stats = outputs.scheduler_stats
        if stats is None or not self._counts_expert_load:
            return
        if stats.num_prompt_tokens or stats.num_generation_tokens:
            self._expert_load_pending = True
        now = time.monotonic()
        due = (now - self._last_expert_load >= EXPERT_LOAD_INTERVAL_S
               or not self.has_unfinished_requests())
        if not (self._expert_load_pending and due):
            return
        self._last_expert_load, self._expert_load_pending = now, False
        stats.expert_load = self.executor.take_expert_load()

    def _fill(self, queue: BatchQueue) -> None:
        """Schedule and dispatch until `depth` batches are in flight or nothing can run."""
        while not queue.full:
            scheduler_output = self.scheduler.schedule()
            if not worth_dispatching(scheduler_output, len(queue)):
                break
            queue.push(scheduler_output, self.executor.execute_model_async(scheduler_output))
            if scheduler_output.is_empty:
                break

    def _give_deferred_bitmasks(self, queue: BatchQueue, oldest_only: bool = False) -> bool:
        """Sample the dispatched steps that wait for their grammar bitmask, oldest first
        (`oldest_only`: just the one about to be collected, should it still wait); whether
        there was one."""
        given = False
        for scheduler_output, handle in queue.pending(1 if oldest_only else None):
            if scheduler_output.grammar_deferred and getattr(handle, "awaiting_bitmask", False):
                handle.sample(self.scheduler.deferred_bitmask(scheduler_output))
                given = True
        return given

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def start_profile(self, directory: str) -> None:
        """Record a trace on every worker until `stop_profile` (engine/worker/profiler.py).
        Misuse is refused here, before it could fail a worker."""
        if self._profiling:
            raise RuntimeError("A profile is already being recorded; call stop_profile() "
                               "first.")
        self.executor.start_profile(directory)
        self._profiling = True

    def stop_profile(self) -> list[str]:
        """Stop recording; the trace and table files the workers wrote."""
        if not self._profiling:
            raise RuntimeError("No profile is being recorded; call start_profile() first.")
        self._profiling = False
        return self.executor.stop_profile()

    def shutdown(self) -> None:
        self.structured.shutdown()
        self.executor.shutdown()
