"""GPU micro-benchmark of the Triton batched multi-LoRA ops (lora_shrink + lora_expand) at
Llama-3-8B's shapes (H 4096; q/k/v slices 4096/1024/1024, or gate/up 14336/14336), rank 16,
8 adapter slots, bf16: time per call against the torch reference and the layer's own base
matmul, for decode batches and prefills.

Rule: every number is a median of `triton.testing.do_bench` on the GPU this runs on, next to
the device copy bandwidth measured in the same run and the device's name. Tokens come in
requests of 1..64 tokens in a row, each request on one random slot or on none (-1), as the
runner lays out a batch ("grouped"); `--interleaved` gives every token its own random slot
(the worst case for the kernels: every adapter in every token block). "bytes" are the ones
the two ops must move (x, the adapters used, buf twice, y read and written); the roofline
is those bytes over the copy bandwidth. Each case checks the kernels against the reference.

    python plugins/cuda/scripts/bench_lora.py [--tokens 1,8,64,256,2048] [--layer qkv|gate_up]
        [--interleaved] [--graph] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_cuda.ops import lora  # noqa: E402
from engine_cuda.ops.bench_ops import copy_bandwidth  # noqa: E402

from platforms import kernels as reference  # noqa: E402

DEVICE = "cuda"
HIDDEN, RANK, SLOTS = 4096, 16, 8
LAYERS = {"qkv": (4096, 1024, 1024), "gate_up": (14336, 14336)}


def make_inputs(tokens: int, slice_sizes: tuple[int, ...], interleaved: bool,
                seed: int = 0) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(torch.bfloat16)

    num_slices = len(slice_sizes)
    slots = torch.randint(-1, SLOTS, (tokens,), generator=gen, device=DEVICE,
                          dtype=torch.int32)
    if not interleaved:
        lengths = torch.randint(1, 65, (tokens,), generator=gen, device=DEVICE)
        request = torch.repeat_interleave(torch.arange(tokens, device=DEVICE), lengths)
        slots = slots[request[:tokens]].contiguous()
    return {
        "x": rand(tokens, HIDDEN),
        "lora_a": rand(num_slices, SLOTS, RANK, HIDDEN, scale=HIDDEN**-0.5),
        "lora_b": rand(num_slices, SLOTS, max(slice_sizes), RANK, scale=RANK**-0.5),
        "slot_ids": slots,
        "y": rand(tokens, sum(slice_sizes)),
        "w": rand(sum(slice_sizes), HIDDEN, scale=HIDDEN**-0.5),  # the base layer's weight
    }


def moved_bytes(x: dict, slice_sizes: tuple[int, ...]) -> int:
    tokens, num_slices = x["x"].shape[0], len(slice_sizes)
    used = len(set(x["slot_ids"].tolist()) - {-1})
    adapters = used * num_slices * RANK * (HIDDEN + max(slice_sizes)) * 2
    return tokens * HIDDEN * 2 + adapters + 2 * num_slices * tokens * RANK * 4 \
        + 2 * tokens * sum(slice_sizes) * 2


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


def check(x: dict, slice_sizes: tuple[int, ...]) -> float:
    """Max error of the kernels' y relative to its largest value, vs the reference."""
    got, want = x["y"].clone(), x["y"].clone()
    lora.lora_expand(got, lora.lora_shrink(x["x"], x["lora_a"], x["slot_ids"]), x["lora_b"],
                     x["slot_ids"], slice_sizes)
    buf = reference.lora_shrink(x["x"], x["lora_a"], x["slot_ids"])
    reference.lora_expand(want, buf, x["lora_b"], x["slot_ids"], slice_sizes)
    return float((got.float() - want.float()).abs().max()) / max(1.0, float(want.abs().max()))


def run_case(tokens: int, args, bandwidth: float) -> dict:
    slice_sizes = LAYERS[args.layer]
    x = make_inputs(tokens, slice_sizes, args.interleaved)
    buf = lora.lora_shrink(x["x"], x["lora_a"], x["slot_ids"])

    def both():
        out = lora.lora_shrink(x["x"], x["lora_a"], x["slot_ids"])
        lora.lora_expand(x["y"], out, x["lora_b"], x["slot_ids"], slice_sizes)

    def torch_both():
        out = reference.lora_shrink(x["x"], x["lora_a"], x["slot_ids"])
        reference.lora_expand(x["y"], out, x["lora_b"], x["slot_ids"], slice_sizes)

    result = {
        "tokens": tokens,
        "adapters_used": len(set(x["slot_ids"].tolist()) - {-1}),
        "max_rel_err": check(x, slice_sizes),
        "shrink_us": bench(lambda: lora.lora_shrink(x["x"], x["lora_a"], x["slot_ids"])),
        "expand_us": bench(lambda: lora.lora_expand(x["y"], buf, x["lora_b"], x["slot_ids"],
                                                    slice_sizes)),
        "triton_us": bench(both),
        "torch_us": bench(torch_both),
        "base_matmul_us": bench(lambda: torch.matmul(x["x"], x["w"].T)),
        "roofline_us": 1e6 * moved_bytes(x, slice_sizes) / bandwidth,
    }
    if args.graph:
        result["triton_graph_us"] = bench(graphed(both))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,64,256,2048")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="qkv")
    parser.add_argument("--interleaved", action="store_true",
                        help="Every token its own random slot (worst case), not requests.")
    parser.add_argument("--graph", action="store_true", help="Also time a CUDA-graph replay.")
    parser.add_argument("--json", help="Write the results here too.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_lora needs an NVIDIA GPU", file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s; layer "
          f"{args.layer} {LAYERS[args.layer]}, H {HIDDEN}, rank {RANK}, {SLOTS} slots, bf16, "
          f"{'interleaved' if args.interleaved else 'grouped'} slots")
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        r = run_case(tokens, args, bandwidth)
        results.append(r)
        graph = f"  graph {r['triton_graph_us']:8.1f}" if args.graph else ""
        print(f"T {tokens:5d} ({r['adapters_used']} adapters): shrink {r['shrink_us']:7.1f}  "
              f"expand {r['expand_us']:7.1f}  both {r['triton_us']:7.1f} us{graph}  | torch "
              f"{r['torch_us']:8.1f}  base matmul {r['base_matmul_us']:7.1f}  roofline "
              f"{r['roofline_us']:6.1f}  err {r['max_rel_err']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
