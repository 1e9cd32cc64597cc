"""How close cuBLAS gets to the copy bandwidth on the batch-1 (and small-batch) GEMMs of a
Llama-3.1-8B decode step, per projection: the data behind the batch-1 decode profile.

    python plugins/cuda/scripts/gemv_shapes.py

Prints, for M = 1, 2, 4, 8 rows and each weight shape, the time of `F.linear(x, W)` and
of the transposed product `(W @ x.T).T`, and the read rate as a share of the measured
device copy bandwidth.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SHAPES = {  # name: (out_features, in_features)
    "qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
    "down": (4096, 14336), "lm_head": (128256, 4096),
}


def _time_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = torch.cuda.CUDAGraph()  # replay many launches back to back, as a decode graph does
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters // 20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_us = _time_us(lambda: dst.copy_(src), iters=40)
    copy_bw = 2 * src.numel() / (copy_us * 1e-6)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print(f"{'shape':>8} {'M':>3} {'linear us':>10} {'% bw':>6} {'W@x.T us':>9} {'% bw':>6}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            a = _time_us(lambda x=x, w=w: F.linear(x, w))
            b = _time_us(lambda x=x, w=w: torch.mm(w, x.t()))
            ideal = w.numel() * 2 / copy_bw * 1e6
            print(f"{name:>8} {m:>3} {a:10.1f} {100 * ideal / a:6.1f} {b:9.1f} "
                  f"{100 * ideal / b:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
