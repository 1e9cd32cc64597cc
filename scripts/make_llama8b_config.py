"""Write a Llama-3.1-8B-shaped model directory without weights: config.json plus a tokenizer
that loads offline. With `--load-format dummy` the engine (and the HF peer) build the model
from the config alone with random weights, which is all a speed benchmark needs.

Rule: the shapes are Llama-3.1-8B's (vocab 128256, 32 layers, hidden 4096, GQA 32/8,
intermediate 14336, llama3 rope scaling); the tokenizer is a word-level one made here with
`tokenizers` (engine.benchmarks.dummy_tokenizer) that has exactly one token per id of that
vocabulary, so any id a random model samples detokenizes, and nothing is downloaded.

    python scripts/make_llama8b_config.py OUT_DIR [--num-hidden-layers N]
"""

from __future__ import annotations

import argparse
import json
import os

VOCAB_SIZE = 128256
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BOS_ID, EOS_ID = 128000, 128001

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}


def special_ids(vocab_size: int) -> tuple[int, int]:
    """(bos, eos): Llama-3's ids, or the last two ids of a smaller vocabulary."""
    if vocab_size > EOS_ID:
        return BOS_ID, EOS_ID
    return vocab_size - 2, vocab_size - 1


def save_tokenizer(out_dir: str, vocab_size: int = VOCAB_SIZE) -> None:
    """A word-level tokenizer with one token per id (`<t123>`, BOS and EOS named as Llama-3's),
    saved as HF files (tokenizer.json + tokenizer_config.json)."""
    from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer

    bos_id, eos_id = special_ids(vocab_size)
    save_word_level_tokenizer(out_dir, vocab_size, bos_id, eos_id, BOS, EOS)


def write_model_dir(out_dir: str, **overrides) -> str:
    """config.json (Llama-3.1-8B shape, `overrides` applied) and the tokenizer into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    config = {**LLAMA_3_1_8B, **overrides}
    config["bos_token_id"], config["eos_token_id"] = special_ids(config["vocab_size"])
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_tokenizer(out_dir, config["vocab_size"])
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-hidden-layers", type=int, default=None,
                        help="Fewer layers for a quick try (the benchmark uses all 32).")
    args = parser.parse_args()
    overrides = {}
    if args.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = args.num_hidden_layers
    print(write_model_dir(args.out_dir, **overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
