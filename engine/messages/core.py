"""Wire messages between an engine-core client and the engine core (msgspec structs).

Rule: the same structs travel in-process (`LLM`) and over ZMQ (`engine serve`), so both
clients behave identically. Token ids only; text lives on the client side.
"""

from __future__ import annotations

import enum
from typing import Optional

import msgspec

from engine.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop token id or a stop string
    LENGTH = 1  # max_tokens or max_model_len
    ABORT = 2  # aborted by the client
    ERROR = 3  # this request failed inside the engine; the others went on (see `error`)

    def __str__(self) -> str:
        return self.name.lower()


class LoRARequest(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A LoRA adapter a request runs with (vLLM's names): `lora_int_id` (>= 1) identifies it
    everywhere (slots, prefix-cache keys, metrics), `lora_path` is a peft directory
    (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1, got {self.lora_int_id} "
                             "(0 is the base model).")


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: Optional[int]
    arrival_time: float
    priority: int = 0
    # Whom the request is for (the OpenAI `user` field): the unit a fair policy shares by.
    tenant: Optional[str] = None
    lora_request: Optional[LoRARequest] = None  # None: the base model


class LogprobsEntry(msgspec.Struct, array_like=True):
    """Chosen token first, then the top-k; `rank` is the chosen token's 1-based rank."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[LogprobsEntry]] = None
    # Prompt logprobs computed this step (positions 1.. of the prompt, in order).
    new_prompt_logprobs: Optional[list[LogprobsEntry]] = None
    finish_reason: Optional[FinishReason] = None
    # The stop token id that ended the request, if any (stop strings are found client-side).
    stop_reason: Optional[int] = None
    num_cached_tokens: int = 0
    # Wall-clock time the request was first scheduled (for queue-time metrics).
    first_scheduled_time: Optional[float] = None
    # Why the request failed, with finish_reason ERROR: one line, no traceback (the core
    # logs that under the request id).
    error: Optional[str] = None
    # The request field at fault when the failure is the request's own (a constraint that
    # does not compile): its client gets a 400 naming it, not a 500.
    error_param: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up since the last stats
    prefix_cache_hits: int = 0  # tokens found since the last stats
    num_preemptions: int = 0  # since the last stats
    num_prompt_tokens: int = 0  # prompt tokens computed since the last stats
    num_generation_tokens: int = 0  # tokens sampled since the last stats
    # Token-slots routed to each global expert since the last report, summed over the MoE
    # layers (expert parallelism only; None in most stats: reported about once a second).
    expert_load: Optional[list[int]] = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: Optional[SchedulerStats] = None
    timestamp: float = 0.0
