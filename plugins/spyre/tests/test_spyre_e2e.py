"""Spyre end to end on the CPU stand-in: SmolLM2 through the whole engine, compiled with the
`eager` backend (and `inductor`, slow), token for token equal to the CPU reference platform;
a request that fits no warm-up shape is refused with the shapes and the variable to change."""

from __future__ import annotations

import pytest
from spyre_testutil import simulate, smollm2_path

from engine import LLM, SamplingParams
from platforms import registry

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,",
           "Write a haiku about the sea.", "Q: What is 2 + 2?\nA:"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14)


@pytest.fixture(scope="module")
def cpu_tokens() -> list[list[int]]:
    registry.reset_registry()
    llm = LLM(model=smollm2_path(), device="cpu", num_kv_blocks=64)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _spyre_llm(monkeypatch, backend: str) -> LLM:
    simulate(monkeypatch, shapes="2x64x16,1x128x16")
    monkeypatch.setenv("ENGINE_SPYRE_COMPILE_BACKEND", backend)
    return LLM(model=smollm2_path(), device="spyre", num_kv_blocks=64)


def _check(llm: LLM, cpu_tokens: list[list[int]]) -> None:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == cpu_tokens
    assert llm.core.scheduler.constraints is not None
    runner = llm.core.executor.runner.forward
    # Steps went through the static runner: both shapes of each warm-up shape compiled.
    assert len(runner.compiled_shapes) == len(runner.step_shapes) == 4


def test_eager_backend_matches_cpu_token_for_token(monkeypatch, cpu_tokens):
    llm = _spyre_llm(monkeypatch, "eager")
    assert llm.core.platform.name == "spyre"
    _check(llm, cpu_tokens)
    # A prompt longer than every warm-up shape's is refused, naming shapes and the variable.
    with pytest.raises(ValueError, match=r"fits none of .*1x128x16.*ENGINE_SPYRE_WARMUP_SHAPES"):
        llm.generate(["word " * 200], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="up to 40 new tokens"):
        llm.generate(["Hi"], SamplingParams(max_tokens=40), use_tqdm=False)
    # The engine still serves after the refusals.
    again = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert again == cpu_tokens[0]


@pytest.mark.slow
def test_inductor_backend_matches_cpu_token_for_token(monkeypatch, cpu_tokens):
    _check(_spyre_llm(monkeypatch, "inductor"), cpu_tokens)
