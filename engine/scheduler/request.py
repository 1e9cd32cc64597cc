"""A request as the scheduler tracks it.

Rule: a request is just its tokens (prompt + output so far) and how many of them have KV in
the cache (`num_computed_tokens`). There is no prefill/decode state: the scheduler closes the
gap between the two, whatever its size.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import Any, Optional

from engine.kv_cache.hashing import BlockHash
from engine.messages.core import EngineCoreRequest, FinishReason, LoRARequest
from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # handling this request raised; it alone ends, with `error`

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[FinishReason]:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: Optional[int] = None,
        arrival_time: Optional[float] = None,
        priority: int = 0,
        extra_keys: tuple[Any, ...] = (),
        tenant: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.tenant = tenant
        self.lora_request = lora_request  # None: the base model
        # Keys besides the tokens that decide whether KV can be shared (cache salt, LoRA id):
        # an adapter changes every layer's K/V, so it never shares blocks with another one
        # or with the base model.
        self.extra_keys = extra_keys if lora_request is None else (
            *extra_keys, ("lora", lora_request.lora_int_id))
        self.output_token_ids: list[int] = []
        # prompt + output, kept as one list so the hot path never concatenates.
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled by batches still in flight, values not known here yet (async
        # scheduling: the next step is scheduled before the last one's output is back).
        self.num_output_placeholders = 0
        # Output tokens the workers have been sent (they learn token values only from the
        # scheduler's outputs; see `CachedRequestData.new_token_ids`).
        self.num_output_tokens_sent = 0
        # The structured-output matcher (`engine.structured_outputs.backend.Grammar`), set
        # by the engine core once compiled; advanced here with every accepted token.
        self.grammar: Optional[Any] = None
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[int] = None
        # Prefix-cache hit length when first scheduled; None until then.
        self.num_cached_tokens: Optional[int] = None
        self.first_scheduled_time: Optional[float] = None  # wall clock, set when admitted
        self.num_preemptions = 0
        # Chained hashes of the full blocks of all_token_ids, extended as tokens arrive.
        self.block_hashes: list[BlockHash] = []

    @classmethod
    def from_engine_core_request(cls, request: EngineCoreRequest) -> Request:
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            eos_token_id=request.eos_token_id,
            arrival_time=request.arrival_time,
            priority=request.priority,
            tenant=request.tenant,
            lora_request=request.lora_request,
        )

    @property
    def all_token_ids(self) -> Sequence[int]:
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def lora_int_id(self) -> Optional[int]:
        """The adapter's id; None for the base model."""
        return None if self.lora_request is None else self.lora_request.lora_int_id

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
