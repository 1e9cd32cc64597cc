"""Compiles requests' grammars off the step loop and fills the step's token bitmask.

Rule: one manager per engine core. Compilation runs in a worker thread (xgrammar's compiler
works outside the GIL), cached by (kind, constraint text), so a request waits only for its
own grammar and a schema seen before is ready at once. The tokenizer and the backend are
built on the first structured request: engines that never see one pay nothing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Optional

import numpy as np

from engine.config import ModelConfig
from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.backend import Grammar, GrammarError, StructuredOutputBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xgrammar")


def check_structured_outputs(params: StructuredOutputsParams) -> None:
    """GrammarError if the constraint is invalid, or no grammar library is installed
    (tokenizer-free; for admission)."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        raise GrammarError("structured outputs need the xgrammar package: "
                           "pip install 'engine[structured]'.") from None
    from engine.structured_outputs.xgrammar_backend import XgrammarBackend

    XgrammarBackend.check(params)


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig, backend: str = "auto",
                 reasoning_parser: Optional[str] = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured outputs backend {backend!r} is not one of "
                             f"{', '.join(BACKENDS)}.")
        self._model_config = model_config
        self.vocab_size = model_config.vocab_size
        self._backend: Optional[StructuredOutputBackend] = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiled: dict[tuple[str, str], concurrent.futures.Future] = {}
        # With a reasoning parser, grammars apply after the reasoning (reasoning_gate.py).
        self._reasoning = None
        if reasoning_parser is not None:
            from engine.reasoning import get_reasoning_parser

            self._reasoning = get_reasoning_parser(reasoning_parser)
        self._tokenizer: Any = None

    def _get_backend(self) -> StructuredOutputBackend:
        with self._lock:
            if self._backend is None:
                from engine.structured_outputs.xgrammar_backend import XgrammarBackend
                from engine.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self._model_config)
                self._backend = XgrammarBackend(self._tokenizer, self.vocab_size)
            return self._backend

    def _gated(self, grammar: Grammar, prompt_token_ids: Optional[list[int]]) -> Grammar:
        """`grammar`, held back while the output reasons (when a reasoning parser is set)."""
        parser = self._reasoning
        if parser is None:
            return grammar
        from engine.structured_outputs.reasoning_gate import ReasoningGate

        tok = self._tokenizer
        prompt_tail = tok.decode(list(prompt_token_ids or [])[-64:]) if tok is not None else ""
        return ReasoningGate(grammar, tok.encode(parser.start, add_special_tokens=False),
                             tok.encode(parser.end, add_special_tokens=False),
                             parser.opens_reasoning(prompt_tail))

    def _compile(self, params: StructuredOutputsParams) -> Any:
        return self._get_backend().compile(params)

    def submit(self, params: StructuredOutputsParams,
               prompt_token_ids: Optional[list[int]] = None) -> concurrent.futures.Future:
        """A future of a fresh matcher for `params` (GrammarError inside if it does not
        compile); the prompt says whether the output starts inside the reasoning."""
        key = (params.kind, params.spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._pool.submit(self._compile, params)
        matcher: concurrent.futures.Future = concurrent.futures.Future()

        def done(f: concurrent.futures.Future) -> None:
            try:
                matcher.set_result(self._gated(self._get_backend().matcher(f.result()),
                                               prompt_token_ids))
            except GrammarError as exc:
                self._compiled.pop(key, None)
                matcher.set_exception(exc)
            except Exception as exc:  # a library failure: this request's, not the engine's
                self._compiled.pop(key, None)
                matcher.set_exception(GrammarError(f"{type(exc).__name__}: {exc}"))

        compiled.add_done_callback(done)
        return matcher

    def bitmask(self, grammars: list[Grammar]) -> tuple[np.ndarray, list[int]]:
        """(bitmask [len(grammars), ceil(vocab / 32)] int32, indexes of grammars that allow
        no token at all: dead ends)."""
        import torch

        words = (self.vocab_size + 31) // 32
        mask = torch.zeros((len(grammars), words), dtype=torch.int32)
        for row, grammar in enumerate(grammars):
            grammar.fill_bitmask(mask, row)
        array = mask.numpy()
        dead = np.nonzero(~array.any(axis=1))[0].tolist()
        return array, dead

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
