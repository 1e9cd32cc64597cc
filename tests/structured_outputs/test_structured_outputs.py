"""Structured outputs on SmolLM2 (real weights, offline `LLM`): JSON schemas, regex, choice
and an EBNF grammar constrain the output; unconstrained neighbours in the batch are
unchanged; a constraint that does not compile is refused naming the library's reason; and
the bitmask op equals its bit-by-bit definition."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, RequestRefusedError, SamplingParams
from engine.sampling_params import InvalidParameter, StructuredOutputsParams
from engine.structured_outputs.backend import GrammarError
from engine.structured_outputs.manager import check_structured_outputs
from platforms.kernels import apply_token_bitmask

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "sizes": {"type": "array", "items": {"type": "integer"},
                                                "minItems": 1, "maxItems": 3}},
     "required": ["colour", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "population": {"type": "number", "minimum": 0}},
        "required": ["name", "population"], "additionalProperties": False}},
     "required": ["city"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
]
ARITHMETIC = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
'''


def _expression_parses(text: str) -> bool:
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not factor():
            return False
        while pos < len(text) and text[pos] in "*/":
            pos += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        return pos > start

    return expr() and pos == len(text)


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(model=smollm2, kv_cache_memory="256m", max_num_seqs=16)


def _constrained(**constraint) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=80,
                          structured_outputs=StructuredOutputsParams(**constraint))


def _cases() -> list[tuple[str, SamplingParams]]:
    cases = [(f"Write JSON for item {i}:", _constrained(json=s)) for i, s in enumerate(SCHEMAS)]
    return cases + [("A phone number:", _constrained(regex=r"\(\d{3}\) \d{3}-\d{4}")),
                    ("Pick a fruit:", _constrained(choice=["apple", "pear", "plum"])),
                    ("Some arithmetic:", _constrained(grammar=ARITHMETIC)),
                    ("Give a JSON object with a name field:", _constrained(json_object=True))]


def _check_languages(outs) -> None:
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    phone, fruit, arithmetic, anything = (o.text for o in outs[len(SCHEMAS):len(SCHEMAS) + 4])
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone), phone
    assert fruit in ("apple", "pear", "plum")
    assert _expression_parses(arithmetic), arithmetic
    assert isinstance(json.loads(anything), dict)


def test_constrained_outputs_are_in_their_language_and_neighbours_are_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    plain_prompts = ["The capital of France is", "def fibonacci(n):"]
    alone = [o.outputs[0].token_ids for o in llm.generate(plain_prompts, plain, use_tqdm=False)]
    cases = _cases()
    prompts = [p for p, _ in cases] + plain_prompts
    params = [p for _, p in cases] + [plain] * len(plain_prompts)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    _check_languages(outs)
    assert [o.token_ids for o in outs[len(cases):]] == alone


def test_the_llguidance_backend_constrains_the_same_languages(smollm2):
    llm = LLM(model=smollm2, kv_cache_memory="128m", max_num_seqs=16,
              structured_outputs_backend="guidance")
    cases = _cases()
    outs = [o.outputs[0] for o in llm.generate([p for p, _ in cases], [p for _, p in cases],
                                                use_tqdm=False)]
    _check_languages(outs)
    with pytest.raises(InvalidParameter, match="not") as err:  # refused by name, not ignored
        llm.generate(["x"], _constrained(json={"not": {"type": "string"}}), use_tqdm=False)
    assert err.value.param == "structured_outputs"


def test_auto_falls_back_to_llguidance_and_never_ignores_a_keyword(llm):
    # xgrammar refuses minProperties without properties; llguidance compiles it.
    schema = {"type": "object", "minProperties": 1}
    out = llm.generate(["A JSON object:"], _constrained(json=schema), use_tqdm=False)[0]
    if out.outputs[0].finish_reason == "stop":
        assert len(json.loads(out.outputs[0].text)) >= 1
    # xgrammar compiles `not` but does not enforce it: auto sends it to llguidance, which
    # refuses it by name; the xgrammar backend refuses it too.
    with pytest.raises(InvalidParameter, match="not"):
        llm.generate(["x"], _constrained(json={"not": {"type": "string"}}), use_tqdm=False)
    with pytest.raises(GrammarError, match="does not enforce"):
        check_structured_outputs(StructuredOutputsParams(
            json={"type": "object", "properties": {"not": {"if": {}}}}), "xgrammar")
    check_structured_outputs(StructuredOutputsParams(  # a property named "not" is fine
        json={"type": "object", "properties": {"not": {"type": "integer"}}}), "xgrammar")


@pytest.mark.parametrize("constraint, words", [
    ({"regex": "[a-"}, "position"), ({"json": "{not json"}, "JSON"),
    ({"grammar": "root ::= foo"}, "line 1"),
])
def test_an_invalid_constraint_is_refused_with_the_librarys_reason(llm, constraint, words):
    with pytest.raises(InvalidParameter, match=words) as err:
        llm.generate(["x"], _constrained(**constraint), use_tqdm=False)
    assert err.value.param == "structured_outputs"


# A Lark grammar llguidance validates without a tokenizer, whose token range the tokenizer
# then refuses: it passes admission and fails to compile in the core.
LATE_FAILING_GRAMMAR = 'start: "a" <[99999999]>'


def test_a_constraint_that_fails_to_compile_later_refuses_its_request_only(llm):
    prompts = ["x", "The capital of France is"]
    params = [_constrained(grammar=LATE_FAILING_GRAMMAR),
              SamplingParams(temperature=0.0, max_tokens=5)]
    with pytest.raises(RequestRefusedError, match="Token range end too large") as err:
        llm.generate(prompts, params, use_tqdm=False)
    assert isinstance(err.value, ValueError) and err.value.param == "structured_outputs"
    bad, good = err.value.outputs
    assert bad.outputs[0].finish_reason == "error"
    assert good.outputs[0].finish_reason == "length" and good.outputs[0].text


def test_a_schema_with_integers_past_64_bits_is_refused_by_name():
    """msgpack has no integers past 64 bits: such a schema is a clear InvalidParameter (a
    400 naming structured_outputs) before it reaches the core (before, the server answered
    500 on such a guided_json; schemathesis found it)."""
    schema = {"type": "integer", "minimum": -225267132376767050907591376896}
    with pytest.raises(InvalidParameter, match="64-bit range"):
        StructuredOutputsParams(json=schema)
    assert StructuredOutputsParams(json={"type": "integer", "minimum": -2**63}).json


def test_exactly_one_constraint():
    with pytest.raises(InvalidParameter, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InvalidParameter, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(InvalidParameter, match="non-empty"):
        StructuredOutputsParams(choice=[])


def test_bitmask_op_equals_its_bit_by_bit_definition():
    gen = torch.Generator().manual_seed(0)
    for rows, vocab, which in ((1, 33, "some"), (5, 100, "some"), (4, 2049, "some"),
                               (6, 300, "all in order"), (6, 300, "all permuted")):
        logits = torch.randn(rows, vocab, generator=gen)
        words = (vocab + 31) // 32
        masked = torch.randperm(rows, generator=gen)[: max(1, rows - 1)]
        if which == "all in order":
            masked = torch.arange(rows)
        elif which == "all permuted":
            masked = torch.tensor([2, 0, 1, 5, 4, 3])
        bitmask = torch.randint(-2**31, 2**31 - 1, (len(masked), words), generator=gen,
                                dtype=torch.int64).to(torch.int32)
        want = logits.clone()
        for k, r in enumerate(masked.tolist()):
            for t in range(vocab):
                if not (int(bitmask[k, t // 32]) >> (t % 32)) & 1:
                    want[r, t] = float("-inf")
        got = logits.clone()
        apply_token_bitmask(got, bitmask, masked)
        assert torch.equal(got, want)


def test_a_complete_language_ends_the_output_even_with_ignore_eos(llm):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="(yes|no)"))
    out = llm.generate(["Answer:"], params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_min_tokens_hiding_the_only_allowed_token_ends_the_output_cleanly(llm):
    """Once "yes" is complete only EOS is allowed, and min_tokens masks EOS: no allowed
    token survives, so the output ends there (schemathesis found this as a 500)."""
    params = SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10,
                            structured_outputs=StructuredOutputsParams(regex="(yes|no)"))
    out = llm.generate(["Answer:"], params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
