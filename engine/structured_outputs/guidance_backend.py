"""The llguidance backend: a second grammar library behind the same interface (its JSON
schema, regex and Lark/GBNF support covers some constraints xgrammar refuses)."""

from __future__ import annotations

import json
from typing import Any

from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.backend import Grammar, GrammarError, StructuredOutputBackend


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar definition of `params`; GrammarError if it is malformed."""
    import llguidance

    kind = params.kind
    try:
        if kind == "json":
            spec = params.spec if isinstance(params.json, str) else json.dumps(params.json)
            return llguidance.grammar_from("json_schema", spec)
        if kind == "json_object":
            return llguidance.grammar_from("json_schema", '{"type": "object"}')
        if kind == "regex":
            return llguidance.grammar_from("regex", params.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(params.choice or []))
        return llguidance.grammar_from("grammar", params.grammar)
    except (ValueError, TypeError) as exc:
        raise GrammarError(_one_line(exc)) from None


class GuidanceGrammar(Grammar):
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        # A refused token would put llguidance's matcher in its error state; ask first.
        if self._matcher.validate_tokens([token_id]) != 1:
            return False
        return bool(self._matcher.consume_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)


class GuidanceBackend(StructuredOutputBackend):
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, vocab_size)

    def compile(self, params: StructuredOutputsParams) -> Any:
        text = grammar_text(params)
        matcher = self._llg.LLMatcher(self._tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return text

    def matcher(self, compiled: Any) -> Grammar:
        return GuidanceGrammar(self._llg.LLMatcher(self._tokenizer, compiled, log_level=0))

    @staticmethod
    def check(params: StructuredOutputsParams) -> None:
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar_text(params))
        if error:
            raise GrammarError(_one_line(error))


def _one_line(exc: Any) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines[:3]) if lines else type(exc).__name__
