"""Messages between the scheduler and the worker side (torch-free).

Rule: the scheduler owns a request's progress and the workers apply it. A request's full
data crosses to the worker once (`NewRequestData`); after that only deltas do
(`CachedRequestData`): new block ids, the output tokens the scheduler learned since (values
the worker would otherwise have to keep from its own results), and where this step starts
(`num_computed_tokens`, which may also move back: recompute from there). Tokens past what the
worker was sent are placeholders: their values are on the device, sampled by the worker's
last step (async scheduling). The step's result is a plain message (`ModelRunnerOutput`).
A preempted request is dropped by the worker (`preempted_req_ids`) and comes back later as a
new request carrying its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from engine.messages.core import LogprobsEntry, LoRARequest
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # Tokens already sampled before a preemption; empty for a fresh request.
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # Per KV-cache group, the request's block table (one list for most models).
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int  # prefix-cache hits (and nothing else) for a new request
    eos_token_id: Optional[int] = None  # the sampler masks it below min_tokens
    lora_request: Optional[LoRARequest] = None  # None: the base model


@dataclass(frozen=True)
class CachedRequestData:
    req_id: str
    new_block_ids: tuple[list[int], ...]  # per KV-cache group, appended to its table
    # Position this step starts at (KV before it is in the cache), as the scheduler records
    # it; a step after rejected tokens starts earlier than the last one ended.
    num_computed_tokens: int
    # Output tokens sampled since the worker last heard of this request, in order.
    new_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # {req_id: tokens to compute this step}; the one decision the scheduler makes.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the worker must forget: finished, aborted or preempted since the last step.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs: the requests that sample this step under a grammar, and their
    # allowed next tokens (numpy int32 [len(structured_req_ids), ceil(vocab / 32)]: bit t
    # of word t // 32 set when token t is allowed).
    structured_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Optional[Any] = None
    # Async scheduling: the bitmask is not known yet (those requests' tokens are in flight);
    # the runner runs the forward pass and samples once the core sends it.
    grammar_deferred: bool = False

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class ModelRunnerOutput:
    req_ids: list[str]
    # One list per request in `req_ids`: the tokens sampled this step (empty while a prompt
    # is still being prefilled in chunks).
    sampled_token_ids: list[list[int]]
    # Per request, one LogprobsEntry per sampled token (None when not asked for).
    logprobs: Optional[list[Optional[list[LogprobsEntry]]]] = None
    # {req_id: LogprobsEntry for the prompt positions computed this step}; the first prompt
    # position has no logprob and is left out.
    prompt_logprobs: dict[str, list[LogprobsEntry]] = field(default_factory=dict)
    # {req_id: why} for requests the worker cannot serve (a token id outside the model's
    # vocabulary, say). They ran this step on harmless stand-in inputs; the scheduler
    # finishes them with an error, the rest of the batch is untouched.
    failed: dict[str, str] = field(default_factory=dict)
