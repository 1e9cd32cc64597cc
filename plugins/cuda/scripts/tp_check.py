"""Tensor parallelism on GPUs: TP=N greedy tokens equal TP=1 on the same dummy-weight model,
and the all-reduce bandwidth of the machine. Each TP size runs in its own process.

    python plugins/cuda/scripts/tp_check.py MODEL_DIR [--tp 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def generate(model: str, tp: int, dtype: str) -> dict:
    from engine import LLM, SamplingParams

    prompts = [{"prompt_token_ids": list(range(100 + 37 * i, 100 + 37 * i + 20 + 9 * i))}
               for i in range(6)]
    llm = LLM(model=model, load_format="dummy", dtype=dtype, tensor_parallel_size=tp,
              max_model_len=1024, gpu_memory_utilization=0.85)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    result = {"tokens": [], "margins": [], "seconds": gen_s}
    for o in outs:
        c = o.outputs[0]
        result["tokens"].append(list(c.token_ids))
        margins = []
        for entry in c.logprobs or []:
            values = sorted((lp.logprob for lp in entry.values()), reverse=True)
            margins.append(values[0] - values[1] if len(values) > 1 else 99.0)
        result["margins"].append(margins)
    return result


def allreduce_bw(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = {}
    for nbytes in (8 * 1024, 1024**2, 256 * 1024**2, 1024**3):
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        iters = 50 if nbytes < 2**28 else 10
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / iters
        rows[nbytes] = {"us": dt * 1e6, "bus_GBps": 2 * (world - 1) / world * nbytes / dt / 1e9}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--child", type=int, default=None)
    ap.add_argument("--out", default="/tmp/tp_check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        (out / f"tp{args.child}.json").write_text(json.dumps(generate(args.model, args.child,
                                                                       args.dtype)))
        return 0
    import torch.multiprocessing as mp

    mp.spawn(allreduce_bw, args=(args.tp, 29517, str(out / "allreduce.json")), nprocs=args.tp)
    for nbytes, row in json.loads((out / "allreduce.json").read_text()).items():
        print(f"all-reduce {int(nbytes):>11,d} B: {row['us']:9.1f} us, bus {row['bus_GBps']:7.1f} GB/s")
    for tp in (1, args.tp):
        proc = subprocess.run([sys.executable, str(HERE), args.model, "--child", str(tp),
                               "--dtype", args.dtype, "--out", str(out)], env=os.environ)
        if proc.returncode:
            print(f"TP={tp} run failed with exit code {proc.returncode}")
            return 1
    one = json.loads((out / "tp1.json").read_text())
    many = json.loads((out / f"tp{args.tp}.json").read_text())
    equal, compared, diverged = 0, 0, []
    for i, (a, b) in enumerate(zip(one["tokens"], many["tokens"], strict=True)):
        n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        compared += 1
        if n == len(a):
            equal += 1
        else:
            diverged.append((i, n, round(one["margins"][i][n], 5)))
    print(f"TP=1 vs TP={args.tp} ({args.dtype}): {equal}/{compared} prompts token-identical over 32 "
          f"steps; diverged (prompt, step, TP=1 top-2 logprob margin there): {diverged}")
    print(f"generate seconds: TP=1 {one['seconds']:.2f}, TP={args.tp} {many['seconds']:.2f}")
    return 0 if equal == compared or all(m < 1e-3 for *_, m in diverged) else 1


if __name__ == "__main__":
    sys.exit(main())
