"""Turns the engine core's token-id outputs into the `RequestOutput`s users see.

Rule: one user request is one parent with `n` completions; each completion is its own
engine-core request (the core knows nothing of `n`), and the user gets ONE `RequestOutput`
per parent carrying the completions that have something to say. Stop strings are found here,
on the client side, so the core must be told to abort a request that a stop string ended:
`process_outputs` returns those ids. State of a request is dropped the moment it finishes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from engine.messages.core import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    LoRARequest,
)
from engine.outputs.completion_state import CompletionState
from engine.outputs.detokenizer import special_token_ids
from engine.outputs.logprobs import TokenTexts
from engine.outputs.request_output import RequestMetrics, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_INT64_SPAN = 2**64
_INT64_MIN = -(2**63)


def child_request_id(index: int, request_id: str) -> str:
    """Engine-core id of completion `index` of a request with n > 1."""
    return f"{index}_{request_id}"


def child_seed(seed: Optional[int], index: int) -> Optional[int]:
    """A distinct, reproducible seed per completion; wraps to stay a signed 64-bit value."""
    if seed is None:
        return None
    return (seed + index - _INT64_MIN) % _INT64_SPAN + _INT64_MIN


@dataclass
class _ParentState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    completions: list[CompletionState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs_sent: bool = False

    @property
    def is_finished(self) -> bool:
        return all(c.is_finished for c in self.completions)


class OutputProcessor:
    """Client-side bookkeeping of every request between `add_request` and its last output."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._token_texts = TokenTexts(tokenizer) if tokenizer is not None else None
        self._special_ids = special_token_ids(tokenizer) if tokenizer is not None else None
        self._parents: dict[str, _ParentState] = {}
        # engine-core request id -> (its parent, its completion); finished ones are removed.
        self._children: dict[str, tuple[_ParentState, CompletionState]] = {}
        # Final outputs of aborted requests, handed out by the next `process_outputs`.
        self._aborted_outputs: list[RequestOutput] = []

    def add_request(
        self,
        request_id: str,
        prompt: Optional[str],
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        priority: int = 0,
        eos_token_id: Optional[int] = None,
        tenant: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
    ) -> list[EngineCoreRequest]:
        """Register a request; returns the engine-core requests to send (one per completion)."""
        if request_id in self._parents:
            raise ValueError(
                f"request_id {request_id!r} is already in use by an unfinished request; "
                "pass a unique request_id."
            )
        parent = _ParentState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            output_kind=params.output_kind,
            completions=[],
            metrics=RequestMetrics(arrival_time=arrival_time),
        )
        core_ids = (
            [request_id]
            if params.n == 1
            else [child_request_id(i, request_id) for i in range(params.n)]
        )
        for core_id in core_ids:
            if core_id in self._children:
                raise ValueError(
                    f"engine-core request id {core_id!r} (request {request_id!r}) clashes with "
                    "an unfinished request; pass a unique request_id."
                )
        core_requests = []
        for index, core_id in enumerate(core_ids):
            child_params = params
            if params.n > 1:
                child_params = params.clone(
                    n=1,
                    seed=child_seed(params.seed, index),
                    # The prompt is shared: only completion 0 needs its logprobs computed.
                    prompt_logprobs=params.prompt_logprobs if index == 0 else None,
                )
            completion = CompletionState(
                index,
                core_id,
                child_params,
                self._tokenizer,
                self._token_texts,
                self._special_ids,
                eos_token_id,
            )
            parent.completions.append(completion)
            self._children[core_id] = (parent, completion)
            core_requests.append(
                EngineCoreRequest(
                    request_id=core_id,
                    prompt_token_ids=prompt_token_ids,
                    sampling_params=child_params,
                    eos_token_id=eos_token_id,
                    arrival_time=arrival_time,
                    priority=priority,
                    tenant=tenant,
                    lora_request=lora_request,
                )
            )
        self._parents[request_id] = parent
        return core_requests

    def process_outputs(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """Apply one batch of engine-core outputs.

        Returns the RequestOutputs to hand out and the engine-core request ids to abort
        (completions ended by a stop string that the core does not know about).
        """
        timestamp = outputs.timestamp or time.time()
        to_abort: list[str] = []
        touched: dict[str, _ParentState] = {}
        for output in outputs.outputs:
            entry = self._children.get(output.request_id)
            if entry is None:
                continue  # aborted or stopped here earlier; the core had not heard yet
            parent, completion = entry
            try:
                stopped_here = completion.update(output)
            except Exception as exc:  # detokenizing this request failed; the rest go on
                logger.exception("Request %r failed on the client side", output.request_id)
                completion.fail(f"{type(exc).__name__}: {exc}")
                stopped_here = True
            if stopped_here and not output.finished:
                to_abort.append(output.request_id)
            self._update_metrics(parent, output, timestamp)
            if completion.is_finished:
                del self._children[output.request_id]
            touched[parent.request_id] = parent
        request_outputs, self._aborted_outputs = self._aborted_outputs, []
        for parent in touched.values():
            if parent.is_finished:
                parent.metrics.finished_time = timestamp
                del self._parents[parent.request_id]
            request_output = self._make_request_output(parent)
            if request_output is not None:
                request_outputs.append(request_output)
        return request_outputs, to_abort

    def abort_request(self, request_id: str) -> list[str]:
        """Finish a request with "abort"; returns the engine-core ids the core must abort.

        Its final RequestOutput comes with the next `process_outputs`. Unknown or already
        finished ids are ignored (the request may have finished in the meantime).
        """
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        core_ids = []
        for completion in parent.completions:
            if not completion.is_finished:
                completion.abort()
                core_ids.append(completion.core_request_id)
            self._children.pop(completion.core_request_id, None)
        parent.metrics.finished_time = time.time()
        request_output = self._make_request_output(parent)
        if request_output is not None:
            self._aborted_outputs.append(request_output)
        return core_ids

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    def _update_metrics(
        self, parent: _ParentState, output: EngineCoreOutput, timestamp: float
    ) -> None:
        metrics = parent.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = output.first_scheduled_time
        if output.new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = timestamp
            metrics.last_token_time = timestamp
            metrics.num_generation_tokens += len(output.new_token_ids)
        parent.num_cached_tokens = max(parent.num_cached_tokens, output.num_cached_tokens)

    def _make_request_output(self, parent: _ParentState) -> Optional[RequestOutput]:
        kind = parent.output_kind
        finished = parent.is_finished
        if kind == RequestOutputKind.FINAL_ONLY:
            if not finished:
                return None
            completions = parent.completions
        elif kind == RequestOutputKind.DELTA:
            completions = [c for c in parent.completions if c.has_new_output()]
        else:
            if not any(c.has_new_output() for c in parent.completions):
                return None
            completions = [c for c in parent.completions if c.token_ids or c.is_finished]
        if not completions:
            return None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=self._prompt_logprobs(parent),
            outputs=[c.make_output(kind) for c in completions],
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
        )

    @staticmethod
    def _prompt_logprobs(parent: _ParentState) -> Optional[list]:
        """Completion 0's prompt logprobs, once complete; DELTA outputs carry them once."""
        gathered = parent.completions[0].prompt_logprobs
        if gathered is None or len(gathered.positions) < len(parent.prompt_token_ids):
            return None
        if parent.output_kind == RequestOutputKind.DELTA:
            if parent.prompt_logprobs_sent:
                return None
            parent.prompt_logprobs_sent = True
        return list(gathered.positions)
