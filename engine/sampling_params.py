"""Sampling parameters of one request.

Rule: every field is validated when the object is built, with an error that names the value,
the allowed range and the parameter to change; nothing downstream re-checks them. The struct is
a msgspec Struct so it crosses the ZMQ boundary between API server and engine core unchanged.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Optional, Union

import msgspec

_SAMPLING_EPS = 1e-5
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's bound on logit_bias values
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


class InvalidParameter(ValueError):
    """A request field outside what the engine takes; `param` names the field (the OpenAI
    error body's `param`), the message says the value, the limit and what to pass instead."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RequestOutputKind(enum.IntEnum):
    """How much of the output each `RequestOutput` of a request carries."""

    CUMULATIVE = 0  # everything produced so far (the `LLM` API)
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Constrain the output to a language (vLLM's names); exactly one field is set.

    `json`: a JSON schema (a dict or its text); `json_object`: any JSON object; `regex`: a
    regular expression the whole output matches; `choice`: one of these strings;
    `grammar`: an EBNF (GBNF) grammar whose start rule is `root`. The engine masks every
    token the language does not allow next, so the output is in the language unless it is
    cut short (max_tokens, a stop string).
    """

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameter(
                "structured_outputs", "structured_outputs takes exactly one of json, regex, "
                f"choice, grammar, json_object; got {given or 'none'}.")
        if isinstance(self.json, dict):
            # The constraint crosses to the engine core as msgpack, which has no integers
            # past 64 bits (a JSON schema may hold any): refuse those here, by name.
            try:
                msgspec.msgpack.encode(self.json)
            except OverflowError:
                raise InvalidParameter(
                    "structured_outputs", "The JSON schema holds an integer outside the "
                    "64-bit range (-2**63 .. 2**64 - 1), which the engine cannot carry; "
                    "write it as a float or a string.") from None
        if self.choice is not None and (not self.choice or not all(
                isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameter("structured_outputs",
                                   "structured_outputs.choice must be non-empty strings.")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (a cache key with `kind`)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if self.kind == "choice":
            return json.dumps(value)
        return "" if self.kind == "json_object" else value


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """How to pick each next token, and when to stop.

    `temperature=0` means greedy. `top_k=None`, `top_p=1.0` and `min_p=0.0` leave the
    distribution untouched. `seed` makes a request's tokens reproducible whatever else shares
    the batch. `stop` strings end the output and are not returned unless
    `include_stop_str_in_output`. `logprobs=k` returns the top-k log-probabilities plus the
    chosen token's at each step; `prompt_logprobs=k` does the same for prompt positions.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = [s for s in self.stop if s]
        self._validate()

    def _validate(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidParameter(name, f"{name} must be a finite number, got {value}.")
        if self.temperature > 100.0:
            raise InvalidParameter(
                "temperature", f"temperature must be at most 100, got {self.temperature}.")
        for token_id, bias in (self.logit_bias or {}).items():
            if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise InvalidParameter(
                    "logit_bias", f"logit_bias value {bias} for token {token_id} must be in "
                    f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]."
                )
        if self.n < 1:
            raise InvalidParameter("n", f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise InvalidParameter(
                "temperature", f"temperature must be non-negative, got {self.temperature}; use 0 for greedy."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            if self.top_k in (0, -1):  # the field's conventional "disabled" values
                self.top_k = None
            else:
                raise InvalidParameter(
                    "top_k", f"top_k must be a positive integer (or 0/-1/None to disable), got {self.top_k}."
                )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameter("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidParameter(
                "presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidParameter(
                "frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}."
            )
        if self.repetition_penalty <= 0.0:
            raise InvalidParameter(
                "repetition_penalty", f"repetition_penalty must be greater than 0, got {self.repetition_penalty}."
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidParameter(
                "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise InvalidParameter(
                "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidParameter(name, f"{name} must be non-negative, got {value}.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidParameter("seed", f"seed must fit in 64 bits, got {self.seed}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def uses_output_history(self) -> bool:
        """Whether sampling reads the tokens sampled so far (the penalties), so the next
        step cannot be scheduled before the last one's tokens are back."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids or ())

    def clone(self, **changes: object) -> SamplingParams:
        """A copy with `changes` applied (validated again)."""
        return msgspec.structs.replace(self, **changes)
