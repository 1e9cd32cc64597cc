"""Logprobs as users see them: `LogprobsEntry` (token ids only) -> `dict[int, Logprob]`.

Rule: the chosen token is always in each position's dict with its true rank; the top-k follow
with ranks 1..k. Token texts are decoded one token at a time (and cached: the vocabulary is
finite), so a token that is part of a multi-byte character shows as U+FFFD, as in vLLM.
"""

from __future__ import annotations

from typing import Any, Optional

from engine.messages.core import LogprobsEntry
from engine.outputs.request_output import Logprob, PositionLogprobs


class TokenTexts:
    """Memoised single-token decoding for `Logprob.decoded_token`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def to_position_logprobs(
    entry: LogprobsEntry, token_texts: Optional[TokenTexts]
) -> PositionLogprobs:
    """One position's logprobs; `token_texts=None` leaves `decoded_token` None."""
    if len(entry.token_ids) != len(entry.logprobs) or not entry.token_ids:
        raise ValueError(
            f"LogprobsEntry has {len(entry.token_ids)} token ids and {len(entry.logprobs)} "
            "logprobs; expected the same number, at least one (the chosen token)."
        )

    def make(token_id: int, logprob: float, rank: int) -> Logprob:
        text = token_texts(token_id) if token_texts is not None else None
        return Logprob(logprob=logprob, rank=rank, decoded_token=text)

    chosen_id = entry.token_ids[0]
    position = {chosen_id: make(chosen_id, entry.logprobs[0], entry.rank)}
    for k, (token_id, logprob) in enumerate(
        zip(entry.token_ids[1:], entry.logprobs[1:], strict=True)
    ):
        if token_id not in position:
            position[token_id] = make(token_id, logprob, k + 1)
    return position


class PromptLogprobs:
    """Prompt logprobs gathered over chunked-prefill steps; position 0 is always None."""

    def __init__(self) -> None:
        self.positions: list[Optional[PositionLogprobs]] = [None]

    def extend(self, entries: list[LogprobsEntry], token_texts: Optional[TokenTexts]) -> None:
        self.positions.extend(to_position_logprobs(e, token_texts) for e in entries)
