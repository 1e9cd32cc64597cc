"""One device, in this process: the executor calls the model runner directly."""

from __future__ import annotations

import os
from typing import Optional

import torch

from engine.config import EngineConfig
from engine.executor.abstract import Executor
from engine.messages.step import ModelRunnerOutput, SchedulerOutput
from engine.worker.model_runner import ModelRunner, StepHandle
from platforms.interface import Platform


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        # Data-parallel replica k (one device each) takes device k of this host.
        local_rank = config.parallel.data_parallel_rank
        if config.parallel.data_parallel_size > 1:  # replicas share this host's threads
            torch.set_num_threads(max(1, (os.cpu_count() or 1) //
                                      config.parallel.data_parallel_size))
        platform.set_device(platform.device(local_rank))
        platform.seed_everything(config.seed)
        self.runner = ModelRunner(config, platform, local_rank=local_rank)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def warm_up(self) -> None:
        self.runner.warm_up()

    @property
    def supports_async_scheduling(self) -> bool:
        return True

    @property
    def supports_deferred_bitmask(self) -> bool:
        return True  # the runner is here: its DeferredSample is the handle

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.runner.execute_model_async(scheduler_output)

    def start_profile(self, directory: str) -> None:
        self.runner.start_profile(directory, "rank0")

    def stop_profile(self) -> list[str]:
        return self.runner.stop_profile()

    def take_expert_load(self) -> Optional[list[int]]:
        return self.runner.take_expert_load()

    def shutdown(self) -> None:
        self.runner.model = None
