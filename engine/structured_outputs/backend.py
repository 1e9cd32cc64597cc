"""The interface a grammar library is used through.

Rule: small and torch-free at the surface: a backend compiles a constraint into a
`Grammar` (thread-safe, cached by the caller), a `Grammar` is one request's matcher: it
accepts tokens, rolls back, says when it has terminated, and fills its row of a bitmask
(int32 words, bit t of word t // 32 set when token t is allowed next).
"""

from __future__ import annotations

import abc
from typing import Any

from engine.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """A constraint the backend cannot compile, with the library's own message."""


class Grammar(abc.ABC):
    """One request's matcher over a compiled grammar."""

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (and no change) when the grammar forbids it."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The output is complete: a stop token was accepted at an accepting state."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write the allowed next tokens into row `row` of `bitmask` (a torch int32 tensor
        of shape [rows, ceil(vocab / 32)] on the host)."""


class StructuredOutputBackend(abc.ABC):
    """Compiles constraints for one tokenizer and vocabulary."""

    name: str

    @abc.abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled form of `params` (shared by every request with the same constraint);
        GrammarError when it cannot be compiled."""

    @abc.abstractmethod
    def matcher(self, compiled: Any) -> Grammar:
        """A fresh matcher at the start of `compiled`."""

    @staticmethod
    def fill_bitmasks(grammars: list[Grammar], bitmask: Any, rows: list[int]) -> None:
        """Fill `rows` of `bitmask` for `grammars` (matchers of this backend); a library
        with a batched, multi-threaded fill overrides this."""
        for grammar, row in zip(grammars, rows):
            grammar.fill_bitmask(bitmask, row)

    @staticmethod
    @abc.abstractmethod
    def check(params: StructuredOutputsParams) -> None:
        """Raise GrammarError if `params` is not a valid constraint (no tokenizer needed:
        the API server checks every request at admission with this)."""
