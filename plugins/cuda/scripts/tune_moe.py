"""Tune the Triton fused-MoE tiles on this GPU and write them to `moe_configs.json` (next to
`engine_cuda/ops/moe.py`), keyed by device name, shape (E, I, H, dtype) and token bucket.

Rule: a config is only ever chosen by measurement on the card it is stored under. For each
token bucket (random softmax routing of that many tokens) and each BLOCK_M, the two GEMMs are
timed alone over their own candidate tiles (the other's choice does not change their
inputs), and the BLOCK_M with the least alignment + gate/up + down time wins. The default
heuristic's tiles are always among the candidates, so a stored entry is never slower than
running without one (on the timing's noise). The winner of each bucket is checked against
the torch reference before it is written. Tiles that do not fit the card (shared memory,
registers) are skipped.

    python plugins/cuda/scripts/tune_moe.py                      # Qwen3-30B-A3B, bf16
    python plugins/cuda/scripts/tune_moe.py --experts 64 --hidden 2048 --inter 1408 --top-k 6
        [--tokens 1,2,4,...] [--full] [--out PATH] [--dry-run]

The quick space (default) has 24 tiles per GEMM and BLOCK_M for small batches and 48 where
there are enough M-blocks to group; --full has 384 (plan on an hour: compiling dominates).
A first pass on a time budget: --tokens 1,8,64,256,4096 (bench_moe's cases).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_cuda.ops import moe  # noqa: E402
from engine_cuda.ops.moe import GemmTile, MoETileConfig  # noqa: E402

from platforms import kernels as reference  # noqa: E402
from platforms.kernels import MoERouting  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
DEVICE = "cuda"


def block_m_candidates(tokens: int, experts: int, top_k: int) -> list[int]:
    """16..128, without blocks far taller than an expert's average run (pure padding)."""
    per_expert = max(1, tokens * top_k // experts)
    return [m for m in (16, 32, 64, 128) if m <= max(16, 4 * per_expert)]


def tile_candidates(full: bool, many_blocks: bool) -> list[GemmTile]:
    if full:
        space = ((32, 64, 128, 256), (32, 64, 128, 256), (1, 8, 16), (4, 8), (2, 3, 4, 5))
    else:
        space = ((32, 64, 128), (64, 128), (1, 8), (4, 8), (3, 4))
    tiles = [GemmTile(*t) for t in itertools.product(*space)]
    return [t for t in tiles if many_blocks or t.group_m == 1]  # grouping needs M-blocks


def _time_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _best(fn_of_tile, tiles: list[GemmTile]) -> tuple[GemmTile, float]:
    """The fastest tile; tiles the card cannot run are skipped."""
    from triton.runtime.errors import OutOfResources

    best, best_us = None, float("inf")
    for tile in tiles:
        try:
            us = _time_us(functools.partial(fn_of_tile, tile))
        except OutOfResources:
            continue
        if us < best_us:
            best, best_us = tile, us
    if best is None:
        raise RuntimeError("no candidate tile runs on this card")
    return best, best_us


def tune_bucket(tokens: int, args, dtype: torch.dtype) -> tuple[MoETileConfig, float, float]:
    """(best config, its microseconds, the default heuristic's) for one token bucket."""
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    hidden = rand(tokens, args.hidden)
    w13 = rand(args.experts, 2 * args.inter, args.hidden, scale=args.hidden**-0.5)
    w2 = rand(args.experts, args.hidden, args.inter, scale=args.inter**-0.5)
    routing = MoERouting(top_k=args.top_k, renormalize=True)
    weights, ids = moe.moe_select_experts(rand(tokens, args.experts), routing)
    flat_w = weights.reshape(-1)
    default = moe.default_config(tokens, args.experts, args.top_k, dtype)
    best_cfg, best_us = None, float("inf")
    for block_m in block_m_candidates(tokens, args.experts, args.top_k):
        plan = moe.plan_experts(ids, args.experts, block_m)
        many = plan.expert_ids.numel() > 8
        tiles = tile_candidates(args.full, many)
        extra = [default.gate_up, default.down] if block_m == default.block_m else []
        tiles = list(dict.fromkeys(tiles + extra))
        gate_up, gu_us = _best(functools.partial(moe.gate_up_gemm, hidden, w13, plan), tiles)
        inter_act = moe.gate_up_gemm(hidden, w13, plan, gate_up)
        down, down_us = _best(functools.partial(moe.down_gemm, inter_act, w2, flat_w, plan),
                              tiles)
        align_us = _time_us(functools.partial(moe.plan_experts, ids, args.experts, block_m))
        total = align_us + gu_us + down_us
        print(f"  tokens {tokens:5d} BLOCK_M {block_m:3d}: align {align_us:6.1f} gate_up "
              f"{gu_us:7.1f} ({gate_up}) down {down_us:7.1f} ({down}) us", flush=True)
        if total < best_us:
            best_cfg, best_us = MoETileConfig(block_m, gate_up, down), total
    default_us = _time_us(lambda: moe.fused_experts(hidden, w13, w2, weights, ids,
                                                    config=default))
    tuned_us = _time_us(lambda: moe.fused_experts(hidden, w13, w2, weights, ids,
                                                  config=best_cfg))
    _check(hidden, w13, w2, weights, ids, best_cfg)
    return best_cfg, tuned_us, default_us


def _check(hidden, w13, w2, weights, ids, cfg: MoETileConfig) -> None:
    got = moe.fused_experts(hidden, w13, w2, weights, ids, config=cfg).float()
    want = reference.fused_experts(hidden.float(), w13.float(), w2.float(), weights, ids)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    if not err <= 2e-2:
        raise AssertionError(f"config {cfg} differs from the reference by {err:.2e}")


def write(path: str, device: str, key: str, entries: dict[int, MoETileConfig]) -> None:
    data = {"configs": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    shapes = data.setdefault("configs", {}).setdefault(device, {})
    shapes[key] = {str(t): cfg.to_json() for t, cfg in sorted(entries.items())}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="Per expert (and TP rank).")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--tokens", default=",".join(map(str, BUCKETS)))
    parser.add_argument("--full", action="store_true", help="The larger candidate space.")
    parser.add_argument("--out", default=moe.CONFIG_PATH)
    parser.add_argument("--dry-run", action="store_true", help="Measure, print, write nothing.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_moe needs a GPU", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    key = moe.config_key(args.experts, args.inter, args.hidden, dtype)
    print(f"{device}: {key}, top-{args.top_k}, {'full' if args.full else 'quick'} space")
    entries, start = {}, time.time()
    for tokens in (int(t) for t in args.tokens.split(",")):
        cfg, tuned_us, default_us = tune_bucket(tokens, args, dtype)
        entries[tokens] = cfg
        print(f"tokens {tokens:5d}: tuned {tuned_us:8.1f} us, default {default_us:8.1f} us "
              f"({default_us / tuned_us:.2f}x) {cfg}", flush=True)
    print(f"tuned {len(entries)} buckets in {time.time() - start:.0f} s")
    if not args.dry_run:
        write(args.out, device, key, entries)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
