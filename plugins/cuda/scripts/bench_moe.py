"""GPU micro-benchmark of the Triton fused MoE at the Qwen3-30B-A3B shape (E=128, top-8,
H=2048, I=768 per expert, bf16): time per call against the torch reference and against the
active-bytes roofline, for decode batches 1, 8, 64, 256 and a 4096-token prefill.

Rule: every number is a median of `triton.testing.do_bench` on the GPU this runs on, next to
the ceiling measured in the same run (device copy bandwidth) and the device's name. "active
bytes" are the weights of the experts the batch actually routes to (each read once) plus the
activations in and out; the roofline is those bytes over the copy bandwidth. The prefill is
compute-bound: its line also gives TFLOP/s against --peak-tflops (H100/H200 SXM dense bf16
by default). Each case checks the kernel against the reference first.

    python plugins/cuda/scripts/bench_moe.py [--tokens 1,8,64,256,4096] [--breakdown]
        [--graph] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_cuda.ops import moe  # noqa: E402
from engine_cuda.ops.bench_ops import copy_bandwidth  # noqa: E402

from platforms import kernels as reference  # noqa: E402
from platforms.kernels import MoERouting  # noqa: E402

DEVICE = "cuda"


def make_inputs(tokens: int, experts: int, hidden: int, inter: int, dtype: torch.dtype,
                seed: int = 0) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    return dict(hidden=rand(tokens, hidden), logits=rand(tokens, experts),
                w13=rand(experts, 2 * inter, hidden, scale=hidden**-0.5),
                w2=rand(experts, hidden, inter, scale=inter**-0.5))


def active_bytes(x: dict, ids: torch.Tensor) -> tuple[int, int]:
    """(bytes a perfect kernel moves, experts used): used experts' weights + activations."""
    used = int(ids.unique().numel())
    per_expert = (x["w13"][0].numel() + x["w2"][0].numel()) * x["w13"].element_size()
    activations = 2 * x["hidden"].numel() * x["hidden"].element_size() + x["logits"].numel() * 2
    return used * per_expert + activations, used


def bench(fn) -> float:
    """Median microseconds per call."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, return_mode="median")


def graphed(fn):
    """fn captured in a CUDA graph (after one eager call): what a decode step replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check(x: dict, routing: MoERouting) -> float:
    """Max error of the kernel relative to the output's largest value, vs the fp32 reference."""
    got = moe.fused_moe(x["hidden"], x["logits"], x["w13"], x["w2"], routing)
    weights, ids = reference.moe_select_experts(x["logits"], routing)
    want = reference.fused_experts(x["hidden"].float(), x["w13"].float(), x["w2"].float(),
                                   weights, ids)
    return float((got.float() - want).abs().max()) / max(1.0, float(want.abs().max()))


def breakdown(x: dict, routing: MoERouting) -> dict[str, float]:
    """Microseconds of each stage, launched alone on the same inputs."""
    num_tokens, num_experts = x["logits"].shape
    inter, hidden = x["w2"].shape[2], x["w2"].shape[1]
    cfg = moe.tile_config(num_tokens, num_experts, routing.top_k, inter, hidden,
                          x["hidden"].dtype, x["hidden"].device)
    weights, ids = moe.moe_select_experts(x["logits"], routing)
    plan = moe.plan_experts(ids, num_experts, cfg.block_m)
    inter_act = moe.gate_up_gemm(x["hidden"], x["w13"], plan, cfg.gate_up)
    slot_out = moe.down_gemm(inter_act, x["w2"], weights.reshape(-1), plan, cfg.down)
    out = torch.empty_like(x["hidden"])
    return {
        "router": bench(lambda: moe.moe_select_experts(x["logits"], routing)),
        "align": bench(lambda: moe.plan_experts(ids, num_experts, cfg.block_m)),
        "gate_up": bench(lambda: moe.gate_up_gemm(x["hidden"], x["w13"], plan, cfg.gate_up)),
        "down": bench(lambda: moe.down_gemm(inter_act, x["w2"], weights.reshape(-1), plan,
                                            cfg.down)),
        "sum": bench(lambda: moe.sum_slots(slot_out, ids, num_experts, out)),
    }


def run_case(tokens: int, args, bandwidth: float) -> dict:
    x = make_inputs(tokens, args.experts, args.hidden, args.inter, torch.bfloat16)
    routing = MoERouting(top_k=args.top_k, renormalize=True)
    err = check(x, routing)
    _, ids = moe.moe_select_experts(x["logits"], routing)
    nbytes, used = active_bytes(x, ids)

    def triton_call():
        return moe.fused_moe(x["hidden"], x["logits"], x["w13"], x["w2"], routing)

    result = dict(tokens=tokens, experts_used=used, max_rel_err=err,
                  triton_us=bench(triton_call),
                  reference_us=bench(lambda: reference.fused_moe(
                      x["hidden"], x["logits"], x["w13"], x["w2"], routing)),
                  active_mb=nbytes / 1e6, roofline_us=1e6 * nbytes / bandwidth,
                  flops=2 * tokens * args.top_k * 3 * args.inter * args.hidden)
    if args.graph:
        result["triton_graph_us"] = bench(graphed(triton_call))
    if args.breakdown:
        result["stages_us"] = breakdown(x, routing)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,8,64,256,4096")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="Dense bf16 peak of the card (H100/H200 SXM: 989).")
    parser.add_argument("--graph", action="store_true", help="Also time a CUDA-graph replay.")
    parser.add_argument("--breakdown", action="store_true", help="Time each stage alone.")
    parser.add_argument("--json", default=None, help="Write the results here too.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe needs a GPU", file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"E={args.experts} k={args.top_k} H={args.hidden} I={args.inter} bf16; tuned "
          f"configs: {'yes' if moe.load_configs() else 'none (default heuristic)'}")
    print(f"{'tokens':>6} {'experts':>7} {'triton us':>10} {'graph us':>9} {'torch us':>9} "
          f"{'speedup':>7} {'act MB':>7} {'roof us':>8} {'% roof':>6} {'TFLOP/s':>8} "
          f"{'% peak':>6} {'err':>8}")
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        r = run_case(tokens, args, bandwidth)
        results.append(r)
        tflops = r["flops"] / (r["triton_us"] * 1e-6) / 1e12
        graph = f"{r['triton_graph_us']:9.1f}" if "triton_graph_us" in r else f"{'-':>9}"
        print(f"{tokens:>6} {r['experts_used']:>7} {r['triton_us']:10.1f} {graph} "
              f"{r['reference_us']:9.1f} {r['reference_us'] / r['triton_us']:7.2f} "
              f"{r['active_mb']:7.1f} {r['roofline_us']:8.1f} "
              f"{100 * r['roofline_us'] / r['triton_us']:6.1f} {tflops:8.1f} "
              f"{100 * tflops / args.peak_tflops:6.1f} {r['max_rel_err']:8.1e}", flush=True)
        if "stages_us" in r:
            print("        stages (us): " + ", ".join(f"{k} {v:.1f}"
                                                      for k, v in r["stages_us"].items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), bandwidth=bandwidth,
                           results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
