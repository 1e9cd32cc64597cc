"""The xgrammar backend (the default).

JSON is compiled without free whitespace (", " and ": " separators, as llguidance writes it):
whitespace means nothing in JSON, and free whitespace lets a small model fill max_tokens
with newlines instead of finishing the object.
"""

from __future__ import annotations

import json
from typing import Any

from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.backend import Grammar, GrammarError, StructuredOutputBackend


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XgrammarGrammar(Grammar):
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class XgrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind, compiler = params.kind, self._compiler
        try:
            if kind == "json":
                return compiler.compile_json_schema(params.spec, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(params.choice or []))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(_one_line(exc)) from None

    def matcher(self, compiled: Any) -> Grammar:
        return XgrammarGrammar(self._xgr.GrammarMatcher(compiled))  # rollback: unlimited

    _batch: Any = None

    @staticmethod
    def fill_bitmasks(grammars: list[Grammar], bitmask: Any, rows: list[int]) -> None:
        """One call for the whole batch: xgrammar fills the rows on its own threads."""
        import xgrammar as xgr

        if XgrammarBackend._batch is None:
            XgrammarBackend._batch = xgr.BatchGrammarMatcher()
        XgrammarBackend._batch.batch_fill_next_token_bitmask(
            [g.matcher for g in grammars], bitmask, rows)  # type: ignore[attr-defined]

    @staticmethod
    def check(params: StructuredOutputsParams) -> None:
        import xgrammar as xgr

        kind = params.kind
        try:
            if kind == "json":
                xgr.Grammar.from_json_schema(params.spec, any_whitespace=False)
            elif kind == "regex":
                xgr.Grammar.from_regex(params.regex)
            elif kind == "grammar":
                xgr.Grammar.from_ebnf(params.grammar)
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(_one_line(exc)) from None


def _one_line(exc: Exception) -> str:
    """The library's message without its source-file prefix ("[time] file.cc:94: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
    while text.split(":", 1)[0].endswith((".cc", ".h")) and ": " in text:
        text = text.split(": ", 1)[1]
    return text
