"""Engine configuration: one typed source for `LLM(...)` keyword arguments and CLI flags.

Rule: `EngineArgs` is what a user writes (every field documented once, here; the CLI flags
are generated from these fields so they never drift). `EngineArgs.create_config()` resolves
it against the model's own config into frozen, fully-determined parts (`ModelConfig`,
`CacheConfig`, `SchedulerConfig`). Nothing mutates a config after that; a problem is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

DType = Literal["auto", "float32", "bfloat16", "float16", "half", "float"]
LoadFormat = Literal["auto", "safetensors", "gguf", "dummy"]
ExecutorBackend = Literal["uniproc", "mp", "ray"]


def parse_size(value: int | str | None) -> Optional[int]:
    """`"32k"` -> 32768, `"1m"` -> 1048576, `"2000"` -> 2000, None -> None."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(value))
    if not match:
        raise ValueError(f"Cannot read {value!r} as a size; write e.g. 4096, 32k or 1m.")
    number, unit = match.groups()
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]
    return int(float(number) * scale)


class EngineArgs(BaseModel):
    """Everything a user can set on the engine. Field docs become `--help` text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="HF directory, GGUF file, or hub id of the model to serve.")
    tokenizer: Optional[str] = Field(
        None, description="Tokenizer directory or hub id; defaults to the model's own."
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DType = Field(
        "auto",
        description="Weights and activations dtype; 'auto' takes the model's, as the platform "
        "supports it (float32 on CPU).",
    )
    load_format: LoadFormat = Field(
        "auto",
        description="'auto' picks safetensors or gguf from the path; 'dummy' makes random "
        "weights from the config alone.",
    )
    max_model_len: Optional[int] = Field(
        None,
        description="Longest prompt + output, in tokens (accepts 32k); defaults to the model's "
        "maximum.",
    )
    max_num_seqs: Optional[int] = Field(
        None, ge=1, description="Most requests in one step; defaults to the platform's (256 "
        "on CPU, 512 on CUDA GPUs)."
    )
    max_num_batched_tokens: Optional[int] = Field(
        None,
        ge=1,
        description="Token budget of one step; prompts longer than this are prefilled in "
        "chunks. Defaults to 2048 (max(max_model_len, 2048) when chunked prefill is off).",
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV-cache blocks of identical prompt prefixes."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Split long prompts across steps to keep decode latency steady."
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="Order of waiting requests: arrival, or `priority` then arrival."
    )
    kv_cache_memory: Optional[int] = Field(
        None,
        description="Bytes of KV cache (accepts 4g); defaults to the platform's sizing from "
        "measured free memory.",
    )
    num_kv_blocks: Optional[int] = Field(
        None, ge=1, description="Exact number of KV-cache blocks (overrides kv_cache_memory)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Share of device memory the engine may use."
    )
    enforce_eager: bool = Field(False, description="Never compile or capture graphs.")
    async_scheduling: Optional[bool] = Field(
        None,
        description="Schedule and prepare step N+1 while step N runs on the device, so the "
        "host's work hides behind it; defaults to on where the platform runs asynchronously "
        "(GPUs) and there is one pipeline stage.",
    )
    device: Optional[str] = Field(
        None, description="Platform to use (e.g. 'cpu'); defaults to the best one available."
    )
    seed: int = Field(0, description="Seed for requests that give none.")
    generation_config: str = Field(
        "auto",
        description="'auto' applies the model's generation_config.json defaults; 'none' "
        "ignores it; or a directory holding one.",
    )
    chat_template: Optional[str] = Field(
        None, description="Chat template (a file path or the template text) to use instead of "
        "the model's."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs / prompt_logprobs k.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Devices each layer is split across (one process per device)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Stages the layers are split into (not available yet: 1 only)."
    )
    data_parallel_size: int = Field(
        1, ge=1, description="Engine replicas (each its own core process and "
        "tensor_parallel_size x pipeline_parallel_size devices) behind one server or LLM; "
        "requests go to the replica with the fewest unfinished ones."
    )
    distributed_executor_backend: Optional[ExecutorBackend] = Field(
        None,
        description="How workers run: 'uniproc' (this process, one device), 'mp' (one "
        "process per device on this host) or 'ray'; defaults to 'mp' when "
        "tensor_parallel_size x pipeline_parallel_size > 1, else 'uniproc'.",
    )

    @field_validator("max_model_len", "kv_cache_memory", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        return parse_size(value)

    def create_config(self) -> EngineConfig:
        from engine.models.loader.resolve import resolve_model_config

        return resolve_model_config(self)


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

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


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
