"""Write a Gemma-2-9B-shaped model directory without weights (config.json and an offline
word-level tokenizer), for `--load-format dummy` benchmarks of a model with alternating
sliding-window and global layers, attention logit soft-capping and a 256k vocabulary.

Rule: the shapes are google/gemma-2-9b's (42 layers, hidden 3584, 16 query / 8 KV heads of
256, intermediate 14336, window 4096 on every other layer, soft-caps 50 / 30).

    python scripts/make_gemma2_9b_config.py OUT_DIR [--num-hidden-layers N] [--sliding-window W]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_llama8b_config import save_tokenizer, special_ids  # noqa: E402

VOCAB_SIZE = 256000

GEMMA_2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": VOCAB_SIZE,
    "torch_dtype": "bfloat16",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-hidden-layers", type=int, default=None)
    parser.add_argument("--sliding-window", type=int, default=None,
                        help="A shorter window, so that benchmarks run past it.")
    args = parser.parse_args()
    config = dict(GEMMA_2_9B)
    if args.num_hidden_layers is not None:
        config["num_hidden_layers"] = args.num_hidden_layers
    if args.sliding_window is not None:
        config["sliding_window"] = args.sliding_window
    config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                             for i in range(config["num_hidden_layers"])]
    config["bos_token_id"], config["eos_token_id"] = special_ids(VOCAB_SIZE)
    config["pad_token_id"] = 0
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_tokenizer(args.out_dir, VOCAB_SIZE)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
