"""The resolved engine configuration: frozen, fully-determined parts.

Rule: `engine.engine_args.EngineArgs` is what a user writes; `EngineArgs.create_config()`
resolves it against the model's own config into these parts (`ModelConfig`, `CacheConfig`,
`SchedulerConfig`, `ParallelConfig`). Nothing mutates a config after that; a problem is an
error. This module imports nothing of the engine, so every layer may read a config;
`EngineConfig.for_platform()` is the part a platform sees (`platforms.config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from platforms.config import ModelShape, PlatformConfig


@dataclass(frozen=True)
class ModelConfig:
    """The model as resolved: where it lives, its HF config, dtype and length limit."""

    model: str
    tokenizer: str
    load_format: str  # "safetensors" | "gguf" | "dummy"
    hf_config: Any  # transformers.PretrainedConfig
    dtype: Any  # torch.dtype; None = "auto": the platform resolves the checkpoint dtype
    max_model_len: int
    architecture: str
    gguf_file: Optional[str] = None  # absolute path when load_format == "gguf"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None
    generation_defaults: Optional[dict[str, Any]] = None  # from generation_config.json
    # "native" (our class for `architecture`) or "transformers" (the HF class run through
    # engine.models.transformers_fallback; `architecture` is then "TransformersForCausalLM").
    model_impl: str = "native"

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        cfg = self.hf_config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.hf_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    kv_cache_memory: Optional[int]
    num_kv_blocks: Optional[int]
    gpu_memory_utilization: float


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: Optional[int]  # None until the platform's default fills it
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    policy: str
    async_scheduling: Optional[bool] = None  # None: the platform decides


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices; world size = tp x pp per engine (dp replicas are
    separate engines, reserved in the rank layout)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str = "uniproc"  # resolved: never None
    # Which replica this engine core is (0..data_parallel_size-1); set by the data-parallel
    # client for each core it starts, so replicas take different devices.
    data_parallel_rank: int = 0
    # MoE experts split across the tensor-parallel ranks (whole experts per rank).
    enable_expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's names): `max_loras` adapters on the device at once (the
    most distinct adapters one step may run), `max_cpu_loras` kept in host memory (LRU
    between the two), adapters of rank up to `max_lora_rank`."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None  # None: max_loras


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: Optional[str]
    seed: int
    enforce_eager: bool
    max_logprobs: int
    parallel: ParallelConfig = ParallelConfig()
    structured_outputs_backend: str = "auto"
    reasoning_parser: Optional[str] = None
    lora: Optional[LoRAConfig] = None  # None: LoRA off (--enable-lora turns it on)

    def for_platform(self) -> PlatformConfig:
        """The settings the platform reads (after `resolve_for_platform` filled dtype and
        max_num_seqs)."""
        model, cache, sched, par = self.model, self.cache, self.scheduler, self.parallel
        if model.dtype is None or sched.max_num_seqs is None:
            raise ValueError("for_platform() needs a resolved config (dtype and max_num_seqs "
                             "set; see engine.engine_core.core.resolve_for_platform).")
        hf = model.hf_config
        return PlatformConfig(
            dtype=model.dtype,
            model=ModelShape(num_layers=model.num_layers, hidden_size=hf.hidden_size,
                             num_heads=hf.num_attention_heads, num_kv_heads=model.num_kv_heads,
                             head_dim=model.head_dim, vocab_size=model.vocab_size),
            block_size=cache.block_size, max_model_len=sched.max_model_len,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_num_seqs=sched.max_num_seqs, enforce_eager=self.enforce_eager,
            kv_cache_memory=cache.kv_cache_memory,
            gpu_memory_utilization=cache.gpu_memory_utilization,
            tensor_parallel_size=par.tensor_parallel_size,
            pipeline_parallel_size=par.pipeline_parallel_size,
            data_parallel_size=par.data_parallel_size,
        )
