"""Output-side fixtures: the real SmolLM2 tokenizer (byte-level BPE: emojis and CJK split
across tokens), shared with the rest of the suite through tests/conftest.py."""

import pytest


@pytest.fixture(scope="session")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer
