"""What users of the `LLM` class and the API server receive for each request.

Rule: plain dataclasses with text already decoded; they carry no tokenizer, no tensors and no
engine-core state, so they can be handed out (and kept) freely. Field names follow what vLLM
users expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

# One position of logprobs: token id -> its logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, "Logprob"]


@dataclass
class Logprob:
    """The log-probability of one token at one position."""

    logprob: float
    rank: Optional[int] = None  # 1-based rank in the distribution; None when unknown
    decoded_token: Optional[str] = None  # None when the request asked for no detokenization


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None  # None unless `logprobs` was requested
    logprobs: Optional[list[PositionLogprobs]] = None
    # "stop" | "length" | "abort" | "error"; None while running
    finish_reason: Optional[str] = None
    # The stop string or stop token id that ended the completion; None for EOS or length.
    stop_reason: Union[int, str, None] = None
    error: Optional[str] = None  # why, when finish_reason is "error"
    error_param: Optional[str] = None  # the request's field at fault, if the request is

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (seconds since the epoch) of one request's life."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_generation_tokens: int = 0

    @property
    def time_to_first_token(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """Everything (or, for DELTA requests, everything new) about one user request."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    # One entry per prompt position; the first is None (nothing precedes it). None when
    # `prompt_logprobs` was not requested, or (DELTA) already sent with an earlier output.
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    num_cached_tokens: int = 0


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (the others went on): raised to its caller.

    `LLM.generate` raises it once every other request is done; `outputs` then holds every
    request's output in order (the failed ones with finish_reason "error")."""

    def __init__(self, request_id: str, message: str,
                 outputs: Optional[list[RequestOutput]] = None) -> None:
        super().__init__(f"Request {request_id!r} failed in the engine: {message}")
        self.request_id = request_id
        self.message = message
        self.outputs = outputs


class RequestRefusedError(RequestFailedError, ValueError):
    """The engine found the request itself at fault (`param` names its field, e.g. a
    constraint that does not compile): a 400 on the server, a ValueError offline."""

    def __init__(self, request_id: str, message: str, param: str,
                 outputs: Optional[list[RequestOutput]] = None) -> None:
        super().__init__(request_id, message, outputs)
        self.param = param


def failure_of(output: RequestOutput,
               outputs: Optional[list[RequestOutput]] = None) -> Optional[RequestFailedError]:
    """The error of the first failed completion of `output` (RequestRefusedError when the
    request was at fault), or None; `outputs`: what the error carries to its caller."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            message = completion.error or "unknown error"
            if completion.error_param is not None:
                return RequestRefusedError(output.request_id, message, completion.error_param,
                                           outputs)
            return RequestFailedError(output.request_id, message, outputs)
    return None
