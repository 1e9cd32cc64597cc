"""A tiny random Llama with a real tokenizer (SmolLM2's, saved beside it) and random peft
adapters of it, for the tests that start an `LLM` or `engine serve` with LoRA."""

from __future__ import annotations

import pathlib

from tests.conftest import smollm2_path
from tests.lora.conftest import ALL_TARGETS, make_adapter, random_hf_model, tiny_llama_config

SMOLLM2_VOCAB = 49152


def make_tiny_llama(directory: pathlib.Path) -> pathlib.Path:
    """Random weights, SmolLM2's tokenizer and chat template: servable as it is."""
    from transformers import AutoTokenizer

    config = tiny_llama_config()
    config.vocab_size = SMOLLM2_VOCAB
    config.max_position_embeddings = 512
    random_hf_model(config).save_pretrained(directory)
    path = pathlib.Path(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_adapters(base: pathlib.Path, root: pathlib.Path, ranks: list[int],
                  targets: list[list[str]] | None = None) -> list[tuple[pathlib.Path, object]]:
    """One random adapter per rank (seeds 1, 2, ...): (directory, peft's merged model)."""
    out = []
    for i, rank in enumerate(ranks):
        directory = root / f"adapter-r{rank}-{i}"
        target = targets[i] if targets else ALL_TARGETS
        merged = make_adapter(base, directory, seed=i + 1, r=rank, lora_alpha=2 * rank,
                              target_modules=target)
        out.append((directory, merged))
    return out
