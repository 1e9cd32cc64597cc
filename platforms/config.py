"""What a platform is told about the engine it runs: the few settings it may read.

Rule: plain frozen data, defined here with the contract and built by the core
(`EngineConfig.for_platform()`), so a plugin never imports the engine's own configuration
and the core may reshape that freely. A setting a platform needs and does not find here is
added here, with the contract version (`platforms.interface.PLATFORM_API_VERSION`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from platforms.util import cdiv

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelShape:
    """The shape of the model being run, as kernels and memory planning need it."""

    num_layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class PlatformConfig:
    """The engine settings a platform reads (resolved: dtype and max_num_seqs are filled in
    before any platform method that takes a config is called).

    Example::

        def graph_runner(self, forward, config, attention):
            if config.enforce_eager:
                return GraphRunner(forward, config, attention)
            return MyGraphRunner(forward, config, attention, max_batch=config.max_num_seqs)
    """

    dtype: torch.dtype  # what the weights, activations and KV cache are held in
    model: ModelShape
    block_size: int  # tokens per KV-cache block
    max_model_len: int  # longest sequence (prompt + output) in tokens
    max_num_batched_tokens: int  # most new tokens in one step
    max_num_seqs: int  # most requests in one step
    enforce_eager: bool  # the user turned graph capture / compilation off
    kv_cache_memory: int | None  # bytes the user gave the KV cache; None: measure
    gpu_memory_utilization: float  # share of device memory the engine may use
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        """Devices one engine core spans (tensor x pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def max_blocks_per_req(self) -> int:
        """KV-cache blocks the longest sequence holds."""
        return cdiv(self.max_model_len, self.block_size)
