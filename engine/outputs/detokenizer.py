"""Incremental detokenization: token ids in, complete text out, O(new tokens) per step.

Rule: never emit text that ends in an incomplete UTF-8 sequence. Byte-level BPE splits emojis
and CJK characters over several tokens, and decoding a prefix of them yields U+FFFD; such a
tail is held back until a later token completes it (or the request finishes).

How (the prefix/read-offset technique): only a short window of recent ids is decoded each
step. `prefix_offset..read_offset` is text already emitted, kept as context so that merges
across the border (and a SentencePiece leading space) decode the same as in a full decode;
`read_offset..` is what is new. The emitted piece is `decode(window) - decode(prefix)`.

Special tokens are decoded as whole segments outside the window: skipped when
`skip_special_tokens`, otherwise emitted as their text, separated from the neighbouring text
by one space when `spaces_between_special_tokens` (the slow HF tokenizers' behaviour; fast
ones ignore the flag, so we apply it here so that it means the same for every tokenizer).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT_CHAR = "\ufffd"


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids the tokenizer would drop under `skip_special_tokens=True`."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(token_id)
    return frozenset(ids)


class IncrementalDetokenizer:
    """Turns one completion's token ids into text, a few tokens at a time."""

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._special_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
        # The current run of ordinary (non-special) ids and its two offsets.
        self._run_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text emitted so far
        # True right after a special token when spaces_between_special_tokens: the next
        # ordinary text gets a separating space.
        self._pending_space = False

    def add_token(self, token_id: int) -> str:
        """Feed one id; returns the text it completes ("" while a character is pending)."""
        if token_id in self._special_ids:
            if self._skip_special_tokens:
                return ""
            return self._add_special(token_id)
        self._run_ids.append(token_id)
        return self._emit_run(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (called once the completion has finished)."""
        return self._emit_run(final=True)

    def _add_special(self, token_id: int) -> str:
        # A special token ends the current run: what it held back can no longer complete.
        piece = self.flush()
        self._run_ids, self._prefix_offset, self._read_offset = [], 0, 0
        special_text = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._spaces_between_special_tokens and self.text:
            special_text = " " + special_text
        self._pending_space = self._spaces_between_special_tokens
        self.text += special_text
        return piece + special_text

    def _emit_run(self, final: bool) -> str:
        if self._read_offset == len(self._run_ids):
            return ""
        decode = self._decode
        prefix_text = decode(self._run_ids[self._prefix_offset : self._read_offset])
        window_text = decode(self._run_ids[self._prefix_offset :])
        if not final and (
            len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        piece = window_text[len(prefix_text) :]
        if self._pending_space:
            # First text after a special token, separated from it (see module docstring).
            piece = " " + piece
            self._pending_space = False
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._run_ids)
        self.text += piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=False)
