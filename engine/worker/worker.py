"""One rank of a multi-process engine: its process groups and its model runner, and the
loop that serves the executor's calls in a worker process.

Rule: a worker does what it is told, in order, and answers every call (result or error
text); it never decides anything. It exits when told to, or within a second of its parent
disappearing, destroying its process groups on the way out.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import sys
import traceback
from typing import Any, Optional

import torch

from engine.config import EngineConfig
from engine.distributed import ParallelGroups, RankLayout
from engine.messages.step import ModelRunnerOutput, SchedulerOutput
from engine.worker.model_runner import ModelRunner, StepHandle
from platforms.interface import Platform

logger = logging.getLogger(__name__)

# Methods the executor may call on a worker (anything else is refused).
WORKER_METHODS = frozenset(
    {"load_model", "determine_num_blocks", "initialize_kv_cache", "warm_up", "execute_model",
     "stage_timeline", "start_profile", "stop_profile", "take_expert_load"}
)
SHUTDOWN = "shutdown"
READY = "ready"


class Worker:
    """Rank `rank` of one engine. Its device is `local_rank`: by default the rank's place
    among this host's devices (data-parallel replica `dp_rank` takes the `world_size`
    devices after the previous replicas'); the Ray executor passes 0, as Ray shows each
    actor only the device it granted."""

    def __init__(self, config: EngineConfig, platform: Platform, rank: int,
                 init_method: str, local_rank: Optional[int] = None) -> None:
        parallel = config.parallel
        layout = RankLayout(parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        self.rank = rank
        if local_rank is None:
            local_rank = parallel.data_parallel_rank * parallel.world_size + rank
        platform.set_device(platform.device(local_rank))
        self.groups: Optional[ParallelGroups] = ParallelGroups(
            platform, layout, rank, init_method,
            expert_parallel=parallel.enable_expert_parallel)
        # Same seed on every rank: unseeded sampling draws the same noise everywhere, and
        # logits are gathered to every rank, so every rank appends the same tokens.
        platform.seed_everything(config.seed)
        runner_cls = ModelRunner
        if parallel.pipeline_parallel_size > 1:
            from engine.worker.pipeline_runner import PipelineStageRunner

            runner_cls = PipelineStageRunner
        self.runner = runner_cls(config, platform, self.groups.context, local_rank=local_rank)
        # The rank whose outputs the executor returns: the first of the last pipeline stage
        # (the stage that samples; rank 0 without pipeline parallelism).
        self.is_driver = rank == layout.output_rank

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def warm_up(self) -> None:
        self.runner.warm_up()

    def execute_model(self, scheduler_output: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        """One step (the driver's output; None elsewhere)."""
        return self.execute_model_async(scheduler_output).result()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> _DriverOnly:
        """Launch one step; the handle's result is the step's output on the driver (None
        elsewhere: only the driver's output travels back)."""
        return _DriverOnly(self.runner.execute_model_async(scheduler_output), self.is_driver)

    def start_profile(self, directory: str) -> None:
        self.runner.start_profile(directory, f"rank{self.rank}")

    def stop_profile(self) -> list[str]:
        return self.runner.stop_profile()

    def take_expert_load(self) -> Optional[list[int]]:
        """Token-slots per global expert since the last take (None: no expert-parallel MoE
        layer on this rank)."""
        return self.runner.take_expert_load()

    def stage_timeline(self) -> list[tuple[float, float]]:
        """(start, end) monotonic times of this pipeline stage's recent forwards (empty
        without pipeline parallelism)."""
        return list(getattr(self.runner, "timeline", ()))

    def shutdown(self) -> None:
        self.runner.model = None
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None


class _DriverOnly:
    """A launched step whose result is the runner's output on the driver, None elsewhere."""

    def __init__(self, handle: StepHandle, is_driver: bool) -> None:
        self._handle, self._is_driver = handle, is_driver

    def ready(self) -> bool:
        return self._handle.ready()

    def result(self) -> Optional[ModelRunnerOutput]:
        output = self._handle.result()
        return output if self._is_driver else None


def _serve(worker: Worker, inbox: Any, outbox: Any, parent_pid: int) -> None:
    """Answer calls, in order, until told to stop or the parent is gone.

    A step is answered as soon as its results are back, but the worker does not wait for
    that before taking the next call: a step that arrives meanwhile is launched first (async
    scheduling keeps the device busy with step N+1 while step N's answer travels)."""
    launched: collections.deque[Any] = collections.deque()  # steps not answered yet

    def answer(ok: bool, payload: Any) -> None:
        outbox.send(pickle.dumps((worker.rank, ok, payload), protocol=pickle.HIGHEST_PROTOCOL))

    def answer_oldest() -> None:
        handle = launched.popleft()
        try:
            answer(True, handle.result())
        except Exception:
            answer(False, traceback.format_exc())

    while True:
        while launched and launched[0].ready():  # done: answer at once (a pipeline stage's
            answer_oldest()                       # next batch may wait for this answer)
        if launched:  # spin until the oldest step is done or a new call comes
            if not inbox.poll(0):
                continue
        elif not inbox.poll(1000):
            if os.getppid() != parent_pid:
                logger.error("Worker %d: the engine process is gone; exiting.", worker.rank)
                return
            continue
        method, args = pickle.loads(inbox.recv())
        if method == SHUTDOWN:
            return
        if method != "execute_model":
            while launched:  # other calls are answered in order, after the steps before
                answer_oldest()
        try:
            if method not in WORKER_METHODS:
                raise ValueError(f"Unknown worker method {method!r}.")
            if method == "execute_model":
                launched.append(worker.execute_model_async(*args))
                continue
            reply = (True, getattr(worker, method)(*args))
        except Exception:
            reply = (False, traceback.format_exc())
            while launched:  # the steps before this call are answered first
                answer_oldest()
        answer(*reply)


def main(argv: Optional[list[str]] = None) -> None:
    """Worker process entry: argv = input address, output address, rank, parent pid.
    The first message brings (config, platform name, rendezvous address, threads)."""
    import zmq

    from platforms.registry import select_platform

    in_address, out_address, rank_text, parent_text = (argv or sys.argv[1:])[:4]
    rank, parent_pid = int(rank_text), int(parent_text)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(message)s")
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(in_address)
    outbox.connect(out_address)
    worker: Optional[Worker] = None
    try:
        config, platform_name, init_method, num_threads = pickle.loads(inbox.recv())
        torch.set_num_threads(num_threads)
        try:
            worker = Worker(config, select_platform(platform_name), rank, init_method)
            outbox.send(pickle.dumps((rank, True, READY)))
        except Exception:
            outbox.send(pickle.dumps((rank, False, traceback.format_exc())))
            return
        _serve(worker, inbox, outbox, parent_pid)
    finally:
        if worker is not None:
            worker.shutdown()
        inbox.close(linger=0)
        outbox.close(linger=1000)
        ctx.term()
