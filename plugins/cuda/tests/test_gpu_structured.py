"""Structured outputs on CUDA: the grammar bitmask's page-locked upload (two buffers used in
turn) and the Triton bitmask kernel, inside the async engine's deferred-bitmask steps.

Rule: a random-weight model with a 128k vocabulary (Llama-3.1-8B's, one small layer) and the
word-level stand-in tokenizer (ids 32-126 spell ASCII); constrained requests beside plain
ones, for more steps than there are buffers. Every constrained output is in its language,
the plain outputs equal a run without constrained neighbours, and the async engine gives
the tokens the synchronous one gives. ENGINE_E2E_DEVICE=cpu runs it on the CPU platform
(a check of the test itself).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch

# float32: random logits over 128k tokens tie within bfloat16 rounding every few steps, and the
# plain outputs are compared across batch compositions.
DEVICE = os.environ.get("ENGINE_E2E_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")
pytest.importorskip("xgrammar")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "n": {"enum": [1, 2, 3]}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    spec = importlib.util.spec_from_file_location(
        "mk", os.path.join(REPO, "scripts", "make_llama8b_config.py"))
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk.write_model_dir(str(tmp_path_factory.mktemp("so")), num_hidden_layers=1,
                              hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64)


def _run(model_dir, requests, async_scheduling):
    from engine import LLM
    from engine.benchmarks.throughput import free_engine

    llm = LLM(model=model_dir, load_format="dummy", dtype="float32", device=DEVICE,
              max_model_len=512, kv_cache_memory="1g", seed=0,
              async_scheduling=async_scheduling)
    outs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    free_engine(llm)
    del llm
    return [o.outputs[0] for o in outs]


def test_structured_requests_on_cuda(model_dir):
    from transformers import AutoTokenizer

    from engine import SamplingParams
    from engine.sampling_params import StructuredOutputsParams

    def constrained(**c):
        return SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                              structured_outputs=StructuredOutputsParams(**c))

    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(40 + 9 * i, 60 + 9 * i))} for i in range(12)]
    requests = [(prompts[i], constrained(json=SCHEMA) if i % 3 == 0 else
                 constrained(regex="[a-e]{4,9}") if i % 3 == 1 else plain) for i in range(12)]
    got = _run(model_dir, requests, async_scheduling=True)
    # The word-level decoder puts spaces between tokens: read the tokens' own strings.
    tok = AutoTokenizer.from_pretrained(model_dir)
    for (_, params), out in zip(requests, got):
        ids = list(out.token_ids)
        if ids and ids[-1] == tok.eos_token_id:  # the grammar's end: EOS, not text
            ids.pop()
        so, text = params.structured_outputs, "".join(tok.convert_ids_to_tokens(ids))
        if so is not None and so.json is not None:
            value = json.loads(text)
            assert set(value) == {"name", "n"} and value["n"] in (1, 2, 3), text
        elif so is not None:
            assert re.fullmatch("[a-e]{4,9}", text), text
    assert max(len(o.token_ids) for o in got) > 4  # more steps than the two buffers
    alone = _run(model_dir, [r for r in requests if r[1] is plain], async_scheduling=True)
    assert [o.token_ids for (_, p), o in zip(requests, got) if p is plain] == \
        [o.token_ids for o in alone]
    in_order = _run(model_dir, requests, async_scheduling=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in in_order]
