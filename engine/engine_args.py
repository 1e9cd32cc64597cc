"""`EngineArgs`: one typed source for `LLM(...)` keyword arguments and CLI flags.

Rule: every field is documented once, here; the CLI flags are generated from these fields
so they never drift. `create_config()` resolves the arguments against the model's own config
(`engine.models.loader.resolve`) into the frozen parts of `engine.config`. It sits above
the models in the layering because resolving needs them (architectures, GGUF headers); the
config it produces sits below everything.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from engine.config import EngineConfig

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
    scheduling_policy: str = Field(
        "fcfs", validation_alias=AliasChoices("scheduling_policy", "scheduler"),
        description="Order of waiting requests: 'fcfs' (arrival), 'priority' (the "
        "request's priority, then arrival), 'fair' (the user served the fewest tokens first), "
        "or a policy a plugin installs under the 'engine.schedulers' entry-point group "
        "(also --scheduler / scheduler=)."
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
    model_impl: Literal["auto", "native", "transformers"] = Field(
        "auto", description="Which implementation runs the model: 'native' (the engine's own "
        "classes only), 'transformers' (the HF *ForCausalLM class, its attention routed to the "
        "engine's paged KV cache), or 'auto': native where the engine has the architecture, "
        "else transformers where its class supports the attention interface."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs / prompt_logprobs k.")
    structured_outputs_backend: Literal["auto", "xgrammar", "guidance"] = Field(
        "auto", description="Grammar library for structured outputs (response_format, "
        "structured_outputs, tool_choice): 'auto' takes xgrammar, and llguidance for a "
        "constraint xgrammar refuses or would not enforce (JSON-schema not/if/then/else)."
    )
    reasoning_parser: Optional[str] = Field(
        None, description="How the model marks its reasoning (deepseek_r1, qwen3, or a "
        "plugin's): the server returns it as reasoning_content, and structured outputs "
        "constrain only the answer after it."
    )
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
    enable_expert_parallel: bool = Field(
        False, description="Mixture-of-experts layers split their experts across the "
        "tensor-parallel ranks (each rank holds num_experts / tensor_parallel_size whole "
        "experts and tokens travel to their experts' ranks through all_to_all) instead of "
        "splitting every expert's intermediate dimension."
    )
    enable_lora: bool = Field(
        False, description="Serve LoRA adapters (peft directories) next to the base model: "
        "each request may name one (LLM.generate(lora_request=...), the server's "
        "--lora-modules and model=NAME); requests of different adapters share a batch."
    )
    max_loras: int = Field(
        1, description="With enable_lora: adapters on the device at once, the most "
        "distinct adapters one step runs; a request whose adapter would be one too many "
        "waits for a later step."
    )
    max_lora_rank: int = Field(
        16, description="With enable_lora: the largest adapter rank accepted (any positive "
        "integer; device slots are this wide)."
    )
    max_cpu_loras: Optional[int] = Field(
        None, description="With enable_lora: adapters kept in host memory (LRU), so one "
        "evicted from the device comes back without reading its files; at least max_loras "
        "(None: max_loras)."
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

    @field_validator("reasoning_parser")
    @classmethod
    def _reasoning_parser(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            from engine.reasoning import get_reasoning_parser

            get_reasoning_parser(value)  # ValueError naming the known ones
        return value

    def create_config(self) -> EngineConfig:
        from engine.models.loader.resolve import resolve_model_config

        return resolve_model_config(self)
