"""The batch bitmask the scheduler sends: the manager does not clear its buffer, because every
backend writes whole rows. Checked here on SmolLM2's tokenizer: each backend's fill, and the
reasoning gate's, writes the same row over garbage as over zeros; the manager's batch (xgrammar
rows in one threaded call, llguidance rows, rows without a grammar) equals row-by-row fills."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.manager import StructuredOutputManager
from engine.structured_outputs.reasoning_gate import ReasoningGate

pytest.importorskip("xgrammar")
pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
GARBAGE = 0x5A5A5A5A


@pytest.fixture(scope="module")
def config(smollm2):
    from engine.engine_args import EngineArgs

    return EngineArgs(model=smollm2).create_config()


@pytest.fixture(scope="module")
def tok(config):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(config.model)


@pytest.fixture(scope="module")
def manager(config):
    manager = StructuredOutputManager(config.model, backend="xgrammar")
    yield manager
    manager.shutdown()


@pytest.fixture(scope="module")
def guidance(config):
    manager = StructuredOutputManager(config.model, backend="guidance")
    yield manager
    manager.shutdown()


def _grammar(manager, **constraint):
    return manager.submit(StructuredOutputsParams(**constraint)).result(timeout=120)


def _advance(grammar, text, tokenizer):
    for t in tokenizer.encode(text, add_special_tokens=False):
        assert grammar.accept_token(t)
    return grammar


def _filled(grammar, words, fill):
    mask = torch.full((1, words), fill, dtype=torch.int32)
    grammar.fill_bitmask(mask, 0)
    return mask[0].clone()


def test_every_fill_writes_its_whole_row(manager, guidance, tok):
    words = (manager.vocab_size + 31) // 32
    grammars = {
        "xgrammar json": _grammar(manager, json=SCHEMA),
        "xgrammar json, inside": _advance(_grammar(manager, json=SCHEMA), '{"n": 1', tok),
        "xgrammar choice": _grammar(manager, choice=["yes", "no"]),
        "llguidance json": _grammar(guidance, json=SCHEMA),
        "llguidance json, inside": _advance(_grammar(guidance, json=SCHEMA), '{"n": 1', tok),
        "gate, reasoning": ReasoningGate(_grammar(manager, regex="[ab]+"),
                                         tok.encode("<think>", add_special_tokens=False),
                                         tok.encode("</think>", add_special_tokens=False),
                                         True),
        "gate, pending": ReasoningGate(_grammar(manager, regex="[ab]+"),
                                       tok.encode("<think>", add_special_tokens=False),
                                       tok.encode("</think>", add_special_tokens=False),
                                       False),
    }
    assert type(grammars["llguidance json"]).__name__ == "GuidanceGrammar"
    for name, grammar in grammars.items():
        over_zeros, over_garbage = _filled(grammar, words, 0), _filled(grammar, words, GARBAGE)
        assert torch.equal(over_zeros, over_garbage), name
        assert over_zeros.any(), name


def test_the_batch_equals_row_by_row_fills(manager, guidance, tok):
    words = (manager.vocab_size + 31) // 32
    grammars = [_grammar(manager, json=SCHEMA), None,
                _advance(_grammar(manager, json=SCHEMA), '{"n": 4', tok),
                _grammar(guidance, json=SCHEMA),
                _grammar(manager, choice=["yes", "no"])]
    array, dead = manager.bitmask(grammars)
    assert array.shape == (len(grammars), words) and array.dtype == np.int32 and dead == []
    for row, grammar in enumerate(grammars):
        want = np.full(words, -1, np.int32) if grammar is None else \
            _filled(grammar, words, 0).numpy()
        assert np.array_equal(array[row], want), row


def test_a_grammar_that_allows_nothing_is_a_dead_end(manager):
    class Nothing:  # what a grammar whose every continuation is forbidden writes
        def fill_bitmask(self, bitmask, row):
            bitmask[row] = 0

    _, dead = manager.bitmask([_grammar(manager, json=SCHEMA), Nothing(), None, Nothing()])
    assert dead == [1, 3]
