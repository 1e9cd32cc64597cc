"""Structured outputs under async scheduling (forced on the CPU, which runs it in order):
a structured request joins consecutive batches, its bitmask filled once its previous token
is applied (a deferred bitmask), and every output equals the one-step-at-a-time engine's."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"], "additionalProperties": False}


def _requests():
    constrained = SamplingParams(temperature=0.0, max_tokens=60,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    sampled = SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA))
    choice = SamplingParams(temperature=0.0, max_tokens=10,
                            structured_outputs=StructuredOutputsParams(choice=["red", "blue"]))
    plain = SamplingParams(temperature=0.0, max_tokens=20)
    prompts = ["A user as JSON:", "Another user:", "A colour:", "The sky is"]
    return prompts, [constrained, sampled, choice, plain]


def _run(llm):
    prompts, params = _requests()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs]


def test_async_structured_outputs_equal_the_in_order_engine(smollm2):
    in_order = LLM(model=smollm2, kv_cache_memory="128m", async_scheduling=False)
    expected = _run(in_order)
    del in_order
    llm = LLM(model=smollm2, kv_cache_memory="128m", async_scheduling=True)
    assert llm.core.scheduler.defer_bitmask
    assert _run(llm) == expected
    for (tokens, finish), in [expected[0]] + [[c] for c in expected[1]]:
        assert finish == "stop"
        jsonschema.validate(json.loads(llm.get_tokenizer().decode(tokens[:-1] if tokens[-1]
                                       == llm.get_tokenizer().eos_token_id else tokens)),
                            SCHEMA)
    # A lone structured request is in two batches at once (not every other step).
    queue = llm.core.batch_queue
    before = queue.num_overlapped
    out = llm.generate(["A user as JSON:"], _requests()[1][0], use_tqdm=False)[0].outputs[0]
    assert queue.num_overlapped - before >= len(out.token_ids) - 2


def test_preempted_structured_requests_resume_their_grammar(smollm2):
    # A KV cache too small for the batch: requests are preempted and recomputed, their
    # grammars keep their place, and every output equals the unpreempted run's.
    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    prompts = [f"User number {i} as JSON:" for i in range(8)]
    roomy = LLM(model=smollm2, kv_cache_memory="128m", max_model_len=128)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM(model=smollm2, kv_cache_memory="6m", max_model_len=128, block_size=16)
    got = [o.outputs[0] for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.get_metrics()["num_preemptions"] > 0
    assert [o.token_ids for o in got] == expected
    for out in got:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_chunked_prompts_and_cached_prefixes_keep_the_grammar(smollm2):
    # Prompts longer than the step's token budget are prefilled over several steps (no row
    # samples until the last chunk); the second run finds their prefixes cached. Outputs
    # equal an engine that prefills each prompt at once without a prefix cache.
    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    story = "Here is a long description of a person who likes hiking and reading. " * 4
    prompts = [f"{story} User {i} as JSON:" for i in range(4)]
    whole = LLM(model=smollm2, kv_cache_memory="128m", max_model_len=256,
                enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in whole.generate(prompts, params, use_tqdm=False)]
    del whole
    chunked = LLM(model=smollm2, kv_cache_memory="128m", max_model_len=256,
                  max_num_batched_tokens=32, max_num_seqs=4)
    assert min(len(chunked.get_tokenizer().encode(p)) for p in prompts) > 32  # 2+ chunks
    for run in range(2):
        got = [o.outputs[0] for o in chunked.generate(prompts, params, use_tqdm=False)]
        assert [o.token_ids for o in got] == expected, run
        for out in got:
            jsonschema.validate(json.loads(out.text), SCHEMA)
    metrics = chunked.get_metrics()
    assert metrics["prefix_cache_hits"] > 0, metrics
