"""Where a batch-1 decode step's time goes on a GPU: forward replay alone, logits and
sampling, the engine's host work between steps, and the kernels.

    python plugins/cuda/scripts/profile_decode.py MODEL_DIR [--out DIR]

MODEL_DIR: a config-only Llama directory (scripts/make_llama8b_config.py) run with dummy
weights in bf16. Prints a short table; cProfile and torch.profiler tables go to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[3]))

import torch  # noqa: E402


def _events_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out", default="/tmp/profile_decode")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1,
                    help="Tensor-parallel size; with more than 1, each rank's trace and op "
                    "table of a 64-token generate (LLM.start_profile) instead.")
    ap.add_argument("--ranks", action="store_true",
                    help="The per-rank trace path (what --tp > 1 takes) at any --tp, so "
                    "TP=1 and TP=2 are profiled alike.")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="Fewer captured decode sizes start faster; batch 1 is the same.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              tensor_parallel_size=args.tp, max_num_seqs=args.max_num_seqs)
    if args.tp > 1 or args.ranks:
        return _profile_ranks(llm, out, args.output_len)
    runner = llm.core.executor.runner
    rows = []

    ids, pos, meta = runner.dummy_decode_batch(1)
    meta_common = None
    with torch.inference_mode():
        replay = _events_ms(lambda: runner.forward(ids, pos, meta))
        hidden = runner.forward(ids, pos, meta)
        logits_ms = _events_ms(lambda: runner.model.compute_logits(hidden))
        argmax_ms = _events_ms(lambda: runner.model.compute_logits(hidden).argmax(-1))
    rows.append(("forward (graph replay incl. input copies), batch 1", replay))
    rows.append(("compute_logits", logits_ms))
    rows.append(("compute_logits + argmax", argmax_ms))
    del meta_common

    prompt = {"prompt_token_ids": list(range(1000, 1128))}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    e2e = (time.perf_counter() - t0) * 1000
    rows.append((f"generate e2e / {args.output_len} tokens", e2e / args.output_len))

    prof = cProfile.Profile()
    prof.enable()
    llm.generate([prompt], params, use_tqdm=False)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(40)
    (out / "cprofile_tottime.txt").write_text(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(60)
    (out / "cprofile_cumulative.txt").write_text(s.getvalue())

    from torch.profiler import ProfilerActivity, profile

    short = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        llm.generate([prompt], short, use_tqdm=False)
        wall = (time.perf_counter() - t0) * 1000
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (out / "torch_profile.txt").write_text(table)
    gpu_us = sum(e.self_device_time_total for e in p.key_averages()
                 if e.device_type is not None and str(e.device_type).endswith("CUDA"))
    rows.append(("profiled 32-token generate: wall ms", wall))
    rows.append(("profiled 32-token generate: GPU kernel ms (sum)", gpu_us / 1000))
    try:
        p.export_chrome_trace(str(out / "trace.json"))
    except Exception:
        pass
    print("\n".join(f"{name:55s} {ms:9.3f} ms" for name, ms in rows))
    print(table[:6000])
    return 0


def _profile_ranks(llm, out: Path, output_len: int) -> int:
    """Each rank writes its own trace (with tensor parallelism the workers run in their own
    processes). Prints the e2e time per token and rank 0's device time per step: an 8-token
    prompt, so the profiled 64 steps are alike (the prefill costs what a decode step does)."""
    from trace_summary import summarize

    from engine import SamplingParams

    prompt = {"prompt_token_ids": list(range(1000, 1128))}
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    print(f"generate e2e / {output_len} tokens: "
          f"{(time.perf_counter() - t0) * 1000 / output_len:.3f} ms")
    steps = 64
    short = {"prompt_token_ids": list(range(1000, 1008))}
    llm.start_profile(str(out / "ranks"))
    t0 = time.perf_counter()
    llm.generate([short], SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True),
                 use_tqdm=False)
    wall = (time.perf_counter() - t0) * 1000
    print(f"profiled {steps}-token generate: wall {wall:.1f} ms = {wall / steps:.3f} ms/step")
    files = llm.stop_profile()
    print("\n".join(files))
    for trace in sorted(f for f in files if f.endswith(".json.gz")):
        print(summarize(Path(trace), steps))
    print((out / "ranks" / "rank0.txt").read_text()[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
