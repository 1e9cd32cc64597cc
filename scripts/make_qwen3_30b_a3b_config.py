"""Write a Qwen3-30B-A3B-shaped model directory without weights (config.json and an offline
word-level tokenizer), for `--load-format dummy` benchmarks of a mixture-of-experts model.

Rule: the shapes are Qwen/Qwen3-30B-A3B's (48 layers, hidden 2048, 32 query / 4 KV heads of
128, 128 experts of intermediate 768 with 8 routed per token and norm_topk_prob, every layer
sparse, vocab 151936, rope theta 1e6); the tokenizer has one token per id of that vocabulary
with Qwen's <|endoftext|> (bos) and <|im_end|> (eos) at their ids, and nothing is downloaded.

    python scripts/make_qwen3_30b_a3b_config.py OUT_DIR [--num-hidden-layers N]
"""

from __future__ import annotations

import argparse
import json
import os

VOCAB_SIZE = 151936
BOS, EOS = "<|endoftext|>", "<|im_end|>"
BOS_ID, EOS_ID = 151643, 151645

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,  # a dense MLP's (mlp_only_layers is empty: none is dense)
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "use_sliding_window": False,
    "sliding_window": None,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
    "use_cache": True,
}


def write_model_dir(out_dir: str, **overrides) -> str:
    """config.json (Qwen3-30B-A3B shape, `overrides` applied) and the tokenizer into out_dir."""
    from engine.benchmarks.dummy_tokenizer import save_word_level_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    config = {**QWEN3_30B_A3B, **overrides}
    config["max_window_layers"] = config["num_hidden_layers"]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_word_level_tokenizer(out_dir, config["vocab_size"], BOS_ID, EOS_ID, BOS, EOS)
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-hidden-layers", type=int, default=None,
                        help="Fewer layers for a quick try (the benchmark uses all 48).")
    args = parser.parse_args()
    overrides = {}
    if args.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = args.num_hidden_layers
    print(write_model_dir(args.out_dir, **overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
