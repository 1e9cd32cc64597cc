"""The client-side state of one completion (one engine-core request).

Rule: tokens are taken one at a time, so a stop string found in the middle of a multi-token
step ends the completion at that token; the tokens after it are dropped, as the model would
never have produced them had the engine core known the stop string.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from engine.messages.core import EngineCoreOutput, FinishReason, LogprobsEntry
from engine.outputs.detokenizer import IncrementalDetokenizer
from engine.outputs.logprobs import PromptLogprobs, TokenTexts, to_position_logprobs
from engine.outputs.request_output import CompletionOutput, PositionLogprobs
from engine.outputs.stop_checker import StopChecker
from engine.sampling_params import RequestOutputKind, SamplingParams


class CompletionState:
    """Tokens, text, logprobs and finish state of completion `index` of a request."""

    def __init__(
        self,
        index: int,
        core_request_id: str,
        params: SamplingParams,
        tokenizer: Any,
        token_texts: Optional[TokenTexts],
        special_ids: Optional[frozenset[int]] = None,
        eos_token_id: Optional[int] = None,
    ) -> None:
        self.index = index
        self.core_request_id = core_request_id
        self._params = params
        self._detokenizer: Optional[IncrementalDetokenizer] = None
        if params.detokenize and tokenizer is not None:
            self._detokenizer = IncrementalDetokenizer(
                tokenizer,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
                special_ids,
            )
        self._token_texts = token_texts if params.detokenize else None
        self._stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        # Tokens that end an output without being part of its text.
        self._stop_token_ids = frozenset(params.stop_token_ids or ()) | (
            {eos_token_id} if eos_token_id is not None else set())
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[PositionLogprobs]] = (
            [] if params.logprobs is not None else None
        )
        self.cumulative_logprob: Optional[float] = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: Optional[PromptLogprobs] = (
            PromptLogprobs() if params.prompt_logprobs is not None else None
        )
        self.finish_reason: Optional[str] = None
        self.stop_reason: Union[int, str, None] = None
        self.error: Optional[str] = None
        self.error_param: Optional[str] = None
        # What earlier DELTA outputs already carried.
        self._num_sent_chars = 0
        self._num_sent_tokens = 0
        self._has_new = False

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: EngineCoreOutput) -> bool:
        """Apply one engine-core output. True when a stop string ended the completion here
        (the engine core does not know yet and must be told to abort the request)."""
        if self.is_finished:
            return False
        if output.finish_reason == FinishReason.ERROR:
            self.fail(output.error or "unknown error", output.error_param)
            return False
        if output.new_prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(output.new_prompt_logprobs, self._token_texts)
        new_ids = output.new_token_ids
        # When the engine core stops on EOS / a stop token id, the last new id is that
        # token (a grammar that completes, or allows nothing more, stops on a real token).
        stop_token_last = output.finish_reason == FinishReason.STOP
        for i, token_id in enumerate(new_ids):
            self._has_new = True
            self.token_ids.append(token_id)
            if output.new_logprobs is not None and i < len(output.new_logprobs):
                self._add_logprobs(output.new_logprobs[i])
            is_stop_token = (stop_token_last and i == len(new_ids) - 1
                             and token_id in self._stop_token_ids)
            if is_stop_token and not self._params.include_stop_str_in_output:
                continue  # the stop token's text is not part of the output
            if self._detokenize_and_check(token_id):
                return True
        if output.finished:
            self._has_new = True
            if self._flush_and_check():
                return False  # the core finished the request itself: nothing to abort
            self.finish_reason = str(output.finish_reason)
            self.stop_reason = output.stop_reason
        return False

    def fail(self, message: str, param: Optional[str] = None) -> None:
        """End with finish_reason "error" (inside the engine, or here on the client); `param`:
        the request's field at fault, when the request itself is."""
        if not self.is_finished:
            self._has_new = True
            self.finish_reason = str(FinishReason.ERROR)
            self.error, self.error_param = message, param

    def abort(self) -> None:
        if not self.is_finished:
            self._has_new = True
            self.finish_reason = str(FinishReason.ABORT)

    def _add_logprobs(self, entry: LogprobsEntry) -> None:
        if self.logprobs is None:
            return
        self.logprobs.append(to_position_logprobs(entry, self._token_texts))
        self.cumulative_logprob = (self.cumulative_logprob or 0.0) + entry.logprobs[0]

    def _detokenize_and_check(self, token_id: int) -> bool:
        if self._detokenizer is None:
            return False
        return self._append_text(self._detokenizer.add_token(token_id))

    def _flush_and_check(self) -> bool:
        if self._detokenizer is None:
            return False
        return self._append_text(self._detokenizer.flush())

    def _append_text(self, piece: str) -> bool:
        if not piece:
            return False
        self.text += piece
        # min_tokens also holds off stop strings, as it holds off EOS in the engine core.
        if len(self.token_ids) <= self._params.min_tokens:
            return False
        match = self._stop_checker.find(self.text, len(piece))
        if match is None:
            return False
        self.text = self.text[: match.text_length]
        self.finish_reason = str(FinishReason.STOP)
        self.stop_reason = match.stop_string
        return True

    def has_new_output(self) -> bool:
        return self._has_new

    def make_output(self, kind: RequestOutputKind) -> CompletionOutput:
        """The CompletionOutput for this step; for DELTA, only what was not sent before."""
        self._has_new = False
        visible = len(self.text)
        if not self.is_finished:
            visible -= self._stop_checker.num_held_back(self.text)
        if kind != RequestOutputKind.DELTA:
            return self._output(self.text[:visible], self.token_ids, self.logprobs)
        start_chars, start_tokens = self._num_sent_chars, self._num_sent_tokens
        self._num_sent_chars = max(visible, start_chars)
        self._num_sent_tokens = len(self.token_ids)
        logprobs = None if self.logprobs is None else self.logprobs[start_tokens:]
        return self._output(self.text[start_chars:visible], self.token_ids[start_tokens:], logprobs)

    def _output(
        self, text: str, token_ids: list[int], logprobs: Optional[list[PositionLogprobs]]
    ) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if logprobs is None else list(logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
            error_param=self.error_param,
        )
