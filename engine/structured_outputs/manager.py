"""Compiles requests' grammars off the step loop and fills the step's token bitmask.

Rule: one manager per engine core. Compilation runs in a worker thread (xgrammar's compiler
works outside the GIL), cached by (kind, constraint text), so a request waits only for its
own grammar and a schema seen before is ready at once. The tokenizer and the backends are
built on the first structured request: engines that never see one pay nothing. Backends:
"auto" takes xgrammar, and llguidance for what xgrammar refuses or would not enforce;
"xgrammar" and "guidance" take only that library.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from engine.config import ModelConfig
from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.backend import Grammar, GrammarError, StructuredOutputBackend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xgrammar", "guidance")
# JSON-schema keywords xgrammar accepts but does not enforce (checked: a schema with them
# compiles, and output that breaks them is accepted). Never silently wrong: under "auto"
# such a schema goes to llguidance, which enforces them or refuses them by name.
XGRAMMAR_IGNORES = frozenset({"not", "if", "then", "else"})
# Keywords whose value maps names to schemas (the names are not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                "dependentSchemas")


def ignored_by_xgrammar(params: StructuredOutputsParams) -> list[str]:
    """The keywords of a JSON-schema constraint that xgrammar would ignore."""
    if params.kind != "json":
        return []
    schema = params.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            return []  # the backend names the syntax error
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in XGRAMMAR_IGNORES:
                    found.add(key)
                if key in _SCHEMA_MAPS and isinstance(value, dict):
                    for sub in value.values():
                        walk(sub)
                elif key not in ("enum", "const", "default", "examples"):
                    walk(value)

    walk(schema)
    return sorted(found)


def _installed(backend: str) -> bool:
    return importlib.util.find_spec("xgrammar" if backend == "xgrammar" else "llguidance") \
        is not None


def _backend_class(name: str) -> type[StructuredOutputBackend]:
    if name == "xgrammar":
        from engine.structured_outputs.xgrammar_backend import XgrammarBackend

        return XgrammarBackend
    from engine.structured_outputs.guidance_backend import GuidanceBackend

    return GuidanceBackend


def candidates(params: StructuredOutputsParams, backend: str) -> list[str]:
    """The backends to try for `params`, in order; GrammarError when none may take it."""
    ignored = ignored_by_xgrammar(params)
    if backend == "xgrammar":
        if ignored:
            raise GrammarError(f"xgrammar does not enforce the JSON-schema keywords {ignored}; "
                               "use --structured-outputs-backend guidance (or auto), or drop "
                               "them.")
        order = ["xgrammar"]
    elif backend == "guidance":
        order = ["guidance"]
    else:
        order = ["guidance"] if ignored else ["xgrammar", "guidance"]
    available = [name for name in order if _installed(name)]
    if not available:
        package = "llguidance" if order == ["guidance"] else "xgrammar"
        raise GrammarError(f"structured outputs need the {package} package: "
                           "pip install 'engine[structured]'.")
    return available


def _first_that_takes(params: StructuredOutputsParams, names: list[str],
                      attempt: Callable[[str], Any]) -> tuple[str, Any]:
    """(backend, attempt(backend)) for the first backend that does not raise GrammarError;
    else a GrammarError with each backend's reason."""
    errors = []
    for name in names:
        try:
            return name, attempt(name)
        except GrammarError as exc:
            errors.append((name, str(exc)))
    if len(errors) == 1:
        raise GrammarError(errors[0][1])
    raise GrammarError("; ".join(f"{name}: {why}" for name, why in errors))


def check_structured_outputs(params: StructuredOutputsParams, backend: str = "auto") -> None:
    """GrammarError if no backend allowed by `backend` takes the constraint, or none is
    installed (tokenizer-free; for admission)."""
    _first_that_takes(params, candidates(params, backend),
                      lambda name: _backend_class(name).check(params))


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig, backend: str = "auto",
                 reasoning_parser: Optional[str] = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured outputs backend {backend!r} is not one of "
                             f"{', '.join(BACKENDS)}.")
        self._model_config = model_config
        self.vocab_size = model_config.vocab_size
        self._backend_name = backend
        self._backends: dict[str, StructuredOutputBackend] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        # (kind, constraint) -> future of (backend name, compiled grammar)
        self._compiled: dict[tuple[str, str], concurrent.futures.Future] = {}
        # With a reasoning parser, grammars apply after the reasoning (reasoning_gate.py).
        self._reasoning = None
        if reasoning_parser is not None:
            from engine.reasoning import get_reasoning_parser

            self._reasoning = get_reasoning_parser(reasoning_parser)
        self._tokenizer: Any = None

    def _get_backend(self, name: str) -> StructuredOutputBackend:
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                if self._tokenizer is None:
                    from engine.tokenizer import load_tokenizer

                    self._tokenizer = load_tokenizer(self._model_config)
                backend = _backend_class(name)(self._tokenizer, self.vocab_size)
                self._backends[name] = backend
            return backend

    def _compile(self, params: StructuredOutputsParams) -> tuple[str, Any]:
        return _first_that_takes(params, candidates(params, self._backend_name),
                                 lambda name: self._get_backend(name).compile(params))

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
                name, compiled = f.result()
                matcher.set_result(self._gated(self._get_backend(name).matcher(compiled),
                                               prompt_token_ids))
            except GrammarError as exc:
                self._compiled.pop(key, None)
                matcher.set_exception(exc)
            except Exception as exc:  # a library failure: this request's, not the engine's
                self._compiled.pop(key, None)
                matcher.set_exception(GrammarError(f"{type(exc).__name__}: {exc}"))

        compiled.add_done_callback(done)
        return matcher

    def bitmask(self, grammars: list[Optional[Grammar]]) -> tuple[np.ndarray, list[int]]:
        """(bitmask [len(grammars), ceil(vocab / 32)] int32, indexes of grammars that allow
        no token at all: dead ends). A None row allows every token.

        Every backend writes whole rows, so the buffer is not cleared first (zeroing 4 MB
        for a batch of 256 on a 128k vocabulary cost more than xgrammar's fill)."""
        import torch

        from engine.structured_outputs.xgrammar_backend import XgrammarBackend, XgrammarGrammar

        words = (self.vocab_size + 31) // 32
        array = np.empty((len(grammars), words), dtype=np.int32)
        mask = torch.from_numpy(array)
        batched = [row for row, g in enumerate(grammars) if type(g) is XgrammarGrammar]
        if len(batched) > 1:  # xgrammar fills these rows in one multi-threaded call
            XgrammarBackend.fill_bitmasks([grammars[row] for row in batched], mask, batched)
        else:
            batched = []
        done = set(batched)
        for row, grammar in enumerate(grammars):
            if row in done:
                continue
            if grammar is None:
                array[row] = -1
            else:
                grammar.fill_bitmask(mask, row)
        # A row is dead when all its words are 0: its largest unsigned 64-bit chunk is 0.
        chunks = array.view(np.uint64) if words % 2 == 0 else array.view(np.uint32)
        dead = np.flatnonzero(chunks.max(axis=1) == 0).tolist() if len(array) else []
        return array, dead

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
