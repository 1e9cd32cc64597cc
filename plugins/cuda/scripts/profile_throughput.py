"""Where the offline-throughput workload's time goes on one GPU: the run against the compute
roofline, host vs device time of every piece of every engine step, and a torch.profiler
window on mixed (prompt + decode) steps and one on decode-only steps, with GPU kernel time by
category.

    python plugins/cuda/scripts/profile_throughput.py MODEL_DIR --num-prompts 300 \\
        --input-len 1024 --output-len 128 [--max-num-seqs 256] \\
        [--max-num-batched-tokens 8192] [--out DIR] [engine args...]

MODEL_DIR: a config-only Llama directory (scripts/make_llama8b_config.py), run with dummy
weights in bf16 (the defaults here). `--device cpu` runs every path but the GPU kernels
(a smoke run on a tiny model). Runs, each on its own prompts (no prefix-cache hits):
  warm-up   a few prompts, so first-call costs (Triton JIT, allocator) stay out of the rest;
  clean     the workload, no probes: total tok/s against the compute roofline;
  probed    the workload with per-step probes (throughput_probes.StepClock);
  profiled  the workload with probes and two torch.profiler windows of --window-steps steps
            each, in the middle of the probed run's longest stretch of mixed steps and of
            decode-only steps (the same schedule repeats); the run is aborted after them.
            Their category shares, weighted by each kind's share of the probed run's wall
            time, estimate where the whole run's device time goes.
Then the engine is freed and copy bandwidth and matmul rate are measured on the same device
(engine.benchmarks.roofline). Tables go to stdout; summary.json, kernels_{mixed,decode}.txt
and trace_{mixed,decode}.json.gz (chrome://tracing, Perfetto) to --out.

Rule: nothing in engine/ changes; the probes patch instance attributes of the live objects
and remove them after each run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[3]))

import throughput_probes as probes  # noqa: E402
import torch  # noqa: E402

from engine.benchmarks import roofline  # noqa: E402
from engine.benchmarks.throughput import (  # noqa: E402
    Result,
    free_engine,
    make_workload,
    run_engine,
    subset,
)
from engine.entrypoints.args import add_engine_args, engine_args_from_namespace  # noqa: E402


class WindowDone(Exception):
    """Raised from the step that closes the last profiler window: ends the run early."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="Model directory (config-only works with dummy weights).")
    ap.add_argument("--num-prompts", type=int, default=300)
    ap.add_argument("--input-len", default="1024", help="Tokens per prompt: N or LO:HI.")
    ap.add_argument("--output-len", default="128", help="Tokens per output: N or LO:HI.")
    ap.add_argument("--bench-seed", type=int, default=0, help="Seed of the first workload.")
    ap.add_argument("--out", default="/tmp/profile_throughput", help="Folder for the files.")
    ap.add_argument("--warmup-prompts", type=int, default=16,
                    help="Prompts of the warm-up run (0: none).")
    ap.add_argument("--clean-run", action=argparse.BooleanOptionalAction, default=True,
                    help="Time the workload once without probes (the headline tok/s).")
    ap.add_argument("--window-steps", type=int, default=12,
                    help="Steps in each profiler window (mixed, decode-only).")
    roofline.add_ceiling_args(ap, default=True,
                              measures="compute roofline (2 x non-embedding params flop/token)")
    add_engine_args(ap)
    ap.set_defaults(load_format="dummy", dtype="bfloat16", max_model_len="2048",
                    max_num_batched_tokens=8192)
    return ap


# ---- runs --------------------------------------------------------------------------------

def probed_run(llm: Any, platform: Any, workload: Any) -> tuple[Result, probes.StepClock]:
    clock = probes.StepClock(llm, platform)
    clock.install()
    try:
        result = run_engine(llm, workload)
    finally:
        clock.uninstall()
    clock.finish()
    return result, clock


def profiled_run(llm: Any, platform: Any, workload: Any, windows: dict[str, tuple[int, int]],
                 on_gpu: bool) -> dict[str, dict[str, Any]]:
    """Probes plus one torch.profiler window per entry of `windows` ({kind: (first step,
    steps)}), the device synchronized at both ends of each so its wall time is honest. The
    run is aborted after the last window."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    clock = probes.StepClock(llm, platform)
    by_start = {start: kind for kind, (start, _) in windows.items()}
    by_last = {start + n - 1: kind for kind, (start, n) in windows.items()}
    done: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}

    def on_start(index: int) -> None:
        if index in by_start:
            platform.synchronize()
            state["prof"] = profile(activities=activities)
            state["prof"].start()
            state["t0"] = time.perf_counter()

    def on_end(index: int) -> None:
        if index in by_last:
            platform.synchronize()
            wall_s = time.perf_counter() - state["t0"]
            state["prof"].stop()
            kind = by_last[index]
            done[kind] = {"prof": state.pop("prof"), "wall_s": wall_s,
                          "first": windows[kind][0], "last": index}
            if len(done) == len(windows):
                raise WindowDone

    clock.on_step_start, clock.on_step_end = on_start, on_end
    clock.install()
    try:
        run_engine(llm, workload)
    except WindowDone:
        pass
    finally:
        clock.uninstall()
        if "prof" in state:  # the run ended inside a window (it should not: same schedule)
            state["prof"].stop()
    clock.finish()
    for w in done.values():
        w["steps"] = clock.steps[w["first"]:w["last"] + 1]
    missing = set(windows) - set(done)
    if missing:
        raise RuntimeError(f"the profiled run ended ({len(clock.steps)} steps) before the "
                           f"window(s) {sorted(missing)} {windows}; its schedule differed "
                           "from the probed run's.")
    return done


# ---- analysis ----------------------------------------------------------------------------

def kernel_stats(prof: Any, out: Path, kind: str) -> tuple[list[probes.KernelStat], float]:
    """Device work of a window from its chrome trace (kept gzipped in `out`), and the busy
    time; the profiler's own table goes to kernels_{kind}.txt."""
    trace_path = out / f"trace_{kind}.json"
    prof.export_chrome_trace(str(trace_path))
    with open(trace_path, encoding="utf-8") as f:
        trace = json.load(f)
    with open(trace_path, "rb") as src, gzip.open(str(trace_path) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace_path.unlink()
    (out / f"kernels_{kind}.txt").write_text(
        prof.key_averages().table(sort_by="self_device_time_total", row_limit=60))
    return probes.trace_kernel_stats(trace)


def bucket_rows(steps: list[probes.StepRecord], key: str) -> list[dict[str, Any]]:
    """Per bucket of steps (by scheduled tokens or by requests): counts and mean times."""
    edges = probes.TOKEN_BUCKETS if key == "tokens" else probes.REQ_BUCKETS
    groups: dict[str, list[probes.StepRecord]] = {}
    for s in steps:
        value = s.num_tokens if key == "tokens" else s.num_reqs
        groups.setdefault(probes.bucket_label(value, edges), []).append(s)
    order = [f"<={e}" for e in edges] + [f">{edges[-1]}"]
    rows = []
    for label in order:
        group = groups.get(label)
        if not group:
            continue
        book = [1000 * sum(s.seconds.get(p, 0.0) for p in (probes.SCHEDULE, probes.UPDATE_BATCH,
                                                           probes.PREPARE, probes.UPDATE))
                for s in group]
        rows.append({
            "bucket": label, "steps": len(group),
            "decode_only": sum(s.is_decode_only for s in group),
            "mean_reqs": statistics.fmean(s.num_reqs for s in group),
            "mean_tokens": statistics.fmean(s.num_tokens for s in group),
            "mean_wall_ms": statistics.fmean(s.wall_ms for s in group),
            "mean_gpu_forward_ms": _mean_or_none([s.gpu_forward_ms for s in group]),
            "mean_gpu_sample_ms": _mean_or_none([s.gpu_sample_ms for s in group]),
            "mean_bookkeeping_ms": statistics.fmean(book),
            "tok_per_s": sum(s.num_tokens for s in group) / max(
                1e-9, sum(s.wall_ms for s in group) / 1000),
        })
    return rows


def _mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def window_summary(kind: str, window: dict[str, Any], num_params: int, head_params: int,
                   out: Path) -> dict[str, Any]:
    steps, wall_us = window["steps"], 1e6 * window["wall_s"]
    stats, busy_us = kernel_stats(window["prof"], out, kind)
    grouped = probes.group_kernels(stats)
    kernel_us = sum(s.device_us for s in stats)
    tokens = sum(s.num_tokens for s in steps)
    sampled = sum(s.num_sampled for s in steps)
    # Every token goes through the body's GEMMs; only sampled rows go through the head.
    gemm_flop = 2 * (num_params - head_params) * tokens + 2 * head_params * sampled
    gemm_us = grouped["gemm"][1] + grouped["split-K reduce"][1]  # a split-K GEMM's two parts
    return {
        "kind": kind, "first_step": window["first"], "steps": len(steps), "tokens": tokens,
        "mean_reqs": statistics.fmean(s.num_reqs for s in steps) if steps else 0.0,
        "sampled_rows": sampled,
        "wall_ms": wall_us / 1000, "kernel_ms": kernel_us / 1000,
        "gpu_busy": kernel_us / wall_us if wall_us else 0.0,
        "gpu_busy_union": busy_us / wall_us if wall_us else 0.0,
        "categories": {c: {"calls": n, "ms": us / 1000, "share_of_wall": us / wall_us}
                       for c, (n, us) in grouped.items()},
        "gemm_tflop_per_s": gemm_flop / (gemm_us * 1e-6) / 1e12 if gemm_us else None,
        "top_kernels": [{"name": s.name, "category": s.category, "calls": s.count,
                         "ms": s.device_us / 1000} for s in stats[:15]],
    }


def kind_weights(steps: list[probes.StepRecord], run_s: float) -> dict[str, float]:
    """Share of the run's wall time spent in mixed steps and in decode-only steps."""
    mixed = sum(s.wall_ms for s in steps if s.num_tokens and not s.is_decode_only) / 1000
    decode = sum(s.wall_ms for s in steps if s.num_tokens and s.is_decode_only) / 1000
    return {"mixed": mixed / run_s, "decode": decode / run_s}


def weighted_categories(summaries: dict[str, dict[str, Any]],
                        weights: dict[str, float]) -> dict[str, float]:
    """Estimated share of the whole run's wall time per kernel category (and "busy"): each
    window's share of its own wall time, weighted by its kind's share of the run."""
    estimate: dict[str, float] = {}
    for kind, w in summaries.items():
        for c, v in w["categories"].items():
            estimate[c] = estimate.get(c, 0.0) + weights[kind] * v["share_of_wall"]
        estimate["busy"] = estimate.get("busy", 0.0) + weights[kind] * w["gpu_busy_union"]
    return estimate


def head_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("lm_head.weight"))


# ---- printing ----------------------------------------------------------------------------

def print_pieces(totals: dict[str, float], num_steps: int, run_s: float) -> None:
    print(f"\n# host pieces, probed run ({num_steps} steps, {run_s:.2f} s)")
    print(f"{'piece':58s} {'total s':>8s} {'ms/step':>8s} {'% run':>6s}")
    for piece in probes.PIECE_ORDER:
        s = totals[piece]
        print(f"{piece:58s} {s:8.3f} {1000 * s / max(1, num_steps):8.3f} "
              f"{100 * s / run_s:6.1f}")


def print_buckets(rows: list[dict[str, Any]], title: str) -> None:
    print(f"\n# steps by {title}")
    print(f"{'bucket':>7s} {'steps':>5s} {'dec':>4s} {'reqs':>6s} {'tokens':>7s} {'wall ms':>8s} "
          f"{'gpu fwd':>8s} {'gpu smp':>8s} {'book ms':>8s} {'tok/s':>9s}")
    for r in rows:
        fwd, smp = r["mean_gpu_forward_ms"], r["mean_gpu_sample_ms"]
        print(f"{r['bucket']:>7s} {r['steps']:5d} {r['decode_only']:4d} {r['mean_reqs']:6.1f} "
              f"{r['mean_tokens']:7.0f} {r['mean_wall_ms']:8.2f} "
              f"{fwd if fwd is not None else float('nan'):8.2f} "
              f"{smp if smp is not None else float('nan'):8.2f} "
              f"{r['mean_bookkeeping_ms']:8.2f} {r['tok_per_s']:9.0f}")
    print("  (dec: decode-only steps; gpu fwd/smp: device time between events around the "
          "forward / logits+sampler; book: schedule + input_batch update/prepare + update)")


def print_window(w: dict[str, Any]) -> None:
    print(f"\n# profiler window, {w['kind']} steps {w['first_step']}.."
          f"{w['first_step'] + w['steps'] - 1}: {w['tokens']} tokens, "
          f"{w['mean_reqs']:.0f} requests/step, "
          f"{w['wall_ms']:.1f} ms wall, kernels {w['kernel_ms']:.1f} ms = "
          f"{100 * w['gpu_busy']:.1f}% GPU busy (union of intervals "
          f"{100 * w['gpu_busy_union']:.1f}%)")
    print(f"{'category':10s} {'calls':>7s} {'ms':>9s} {'% wall':>7s}")
    for c, v in w["categories"].items():
        print(f"{c:10s} {v['calls']:7d} {v['ms']:9.2f} {100 * v['share_of_wall']:7.1f}")
    if w["gemm_tflop_per_s"] is not None:
        print(f"GEMM rate in the window: {w['gemm_tflop_per_s']:.0f} TFLOP/s")
    print("top kernels:")
    for k in w["top_kernels"]:
        print(f"  {k['ms']:9.2f} ms {k['calls']:6d}x {k['category']:9s} {k['name'][:110]}")


def print_estimate(estimate: dict[str, float], weights: dict[str, float]) -> None:
    print(f"\n# whole-run estimate (mixed steps {100 * weights['mixed']:.1f}% of the run, "
          f"decode-only {100 * weights['decode']:.1f}%): kernel time as % of run wall")
    for c, share in estimate.items():
        print(f"{c:10s} {100 * share:6.1f}")


def print_summary(rows: list[tuple[str, str]]) -> None:
    print("\n# summary")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:{width}s}  {v}")


# ---- main --------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    on_gpu = args.device != "cpu"
    if on_gpu and not torch.cuda.is_available():
        print("profile_throughput needs a CUDA GPU (torch.cuda.is_available() is False); run "
              "it on the GPU machine, or pass --device cpu for a smoke run.", file=sys.stderr)
        return 2
    if args.window_steps < 1:
        print(f"--window-steps must be >= 1 (got {args.window_steps}).", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from engine.benchmarks.dummy_tokenizer import tokenizer_override
    from engine.entrypoints.llm import LLM

    tokenizer = tokenizer_override(args.model, args.load_format, args.tokenizer)
    engine_args = engine_args_from_namespace(args, model=args.model, tokenizer=tokenizer)
    t0 = time.perf_counter()
    llm = LLM(**engine_args.model_dump())
    print(f"engine startup: {time.perf_counter() - t0:.2f} s; "
          + roofline.startup_line(llm.core.startup_timings))
    sched = llm.config.scheduler
    print(f"max_num_seqs {sched.max_num_seqs}, max_num_batched_tokens "
          f"{sched.max_num_batched_tokens}, max_model_len {sched.max_model_len}")
    platform = llm.core.platform
    device_name = torch.cuda.get_device_name() if on_gpu else platform.name
    tok = llm.get_tokenizer()

    def workload(k: int) -> Any:  # a fresh seed per run: no prefix-cache hits across runs
        return make_workload(tok, args.num_prompts, args.input_len, args.output_len,
                             args.bench_seed + k, None)

    report: dict[str, Any] = {"device": device_name, "args": {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}}
    if args.warmup_prompts > 0:
        warm = run_engine(llm, subset(workload(100), args.warmup_prompts))
        print(f"warm-up: {warm.num_requests} prompts in {warm.seconds:.2f} s")
        llm.reset_prefix_cache()
    clean = None
    if args.clean_run:
        clean = run_engine(llm, workload(0))
        llm.reset_prefix_cache()
        print(f"clean run: {clean.seconds:.2f} s, "
              f"{(clean.prompt_tokens + clean.output_tokens) / clean.seconds:.0f} tok/s")
    probed, clock = probed_run(llm, platform, workload(1))
    llm.reset_prefix_cache()
    print(f"probed run: {probed.seconds:.2f} s, {len(clock.steps)} steps"
          + (f"; not in this engine, so not timed: {', '.join(clock.skipped)}"
             if clock.skipped else ""))
    windows = probes.choose_windows(clock.steps, args.window_steps)
    profiled = profiled_run(llm, platform, workload(2), windows, on_gpu)
    print("profiled run: " + ", ".join(f"{k} steps {a}..{a + n - 1}"
                                       for k, (a, n) in windows.items()))

    model = roofline.counted_model(llm)
    num_params, head_params = roofline.non_embedding_params(model), head_parameters(model)
    free_engine(llm)
    del llm, model
    ceilings = (roofline.measure(platform, args.roofline_copy_mib << 20,
                                 args.roofline_matmul_size) if args.ceilings else None)

    totals = clock.piece_seconds(probed.seconds)
    print_pieces(totals, len(clock.steps), probed.seconds)
    token_rows, req_rows = bucket_rows(clock.steps, "tokens"), bucket_rows(clock.steps, "reqs")
    print_buckets(token_rows, "scheduled tokens")
    print_buckets(req_rows, "scheduled requests")
    summaries = {k: window_summary(k, w, num_params, head_params, out)
                 for k, w in profiled.items()}
    for w in summaries.values():
        print_window(w)
        if on_gpu and w["kernel_ms"] == 0:
            print(f"WARNING: the profiler recorded no device work in the {w['kind']} window; "
                  f"see kernels_{w['kind']}.txt")
    weights = kind_weights(clock.steps, probed.seconds)
    estimate = weighted_categories(summaries, weights)
    print_estimate(estimate, weights)

    report.update(_summary(clean, probed, clock, totals, summaries, estimate, ceilings,
                           num_params))
    report.update({"pieces_s": totals, "buckets_by_tokens": token_rows,
                   "buckets_by_reqs": req_rows, "windows": summaries,
                   "kind_weights": weights, "estimated_share_of_run": estimate})
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    print_summary(report["summary_rows"])
    print(f"files in {out}: summary.json, kernels_<kind>.txt, trace_<kind>.json.gz")
    return 0


def _summary(clean: Optional[Result], probed: Result, clock: probes.StepClock,
             totals: dict[str, float], summaries: dict[str, dict[str, Any]],
             estimate: dict[str, float], ceilings: Any, num_params: int) -> dict[str, Any]:
    """The last table: headline rate, roofline, where the run's wall time went."""
    rows: list[tuple[str, str]] = []
    head = clean or probed
    tokens = head.prompt_tokens + head.output_tokens
    rate = tokens / head.seconds
    out: dict[str, Any] = {"total_tok_per_s": rate, "run_s": head.seconds,
                           "probed_run_s": probed.seconds}
    rows.append((f"{'clean' if clean else 'probed'} run",
                 f"{head.seconds:.2f} s, {rate:,.0f} tok/s ({head.num_requests} prompts, "
                 f"{tokens:,} tokens)"))
    rows.append(("probed run", f"{probed.seconds:.2f} s ({100 * (probed.seconds / head.seconds - 1):+.1f}% "
                 f"vs {'clean' if clean else 'itself'}), {len(clock.steps)} steps, "
                 f"{1000 * probed.seconds / max(1, len(clock.steps)):.2f} ms/step"))
    if ceilings is not None:
        line = roofline.compute_roofline(num_params, ceilings, rate)
        out.update(roofline_tok_per_s=line.ceiling, roofline_percent=line.percent,
                   matmul_tflop_per_s=ceilings.matmul_flop_per_s / 1e12)
        rows.append(("compute roofline", f"{line.ceiling:,.0f} tok/s "
                     f"({ceilings.matmul_flop_per_s / 1e12:.4g} TFLOP/s / 2 x "
                     f"{num_params:,} params) -> {line.percent:.1f}%; ideal "
                     f"{tokens / line.ceiling:.2f} s for this workload"))
    gpu_s = sum((s.gpu_forward_ms or 0) + (s.gpu_sample_ms or 0) for s in clock.steps) / 1000
    out["event_gpu_busy"] = gpu_s / probed.seconds
    rows.append(("device time in events (probed)",
                 f"{gpu_s:.2f} s = {100 * gpu_s / probed.seconds:.1f}% of the run "
                 "(forward + logits/sampler intervals)"))
    for label, piece in (("schedule", probes.SCHEDULE), ("input_batch.prepare", probes.PREPARE),
                         ("update_from_output", probes.UPDATE),
                         ("output processing", probes.OUTPUTS),
                         ("forward host (launch)", probes.FORWARD),
                         ("sampler incl. sync wait", probes.SAMPLER)):
        rows.append((f"  {label}", f"{totals[piece]:.2f} s = "
                     f"{100 * totals[piece] / probed.seconds:.1f}% of the probed run"))
    for kind, w in summaries.items():
        rows.append((f"{kind} window ({w['steps']} steps)",
                     f"GPU busy {100 * w['gpu_busy_union']:.1f}% of {w['wall_ms']:.0f} ms, "
                     f"{w['wall_ms'] / max(1, w['steps']):.1f} ms/step, "
                     f"{w['tokens'] / max(1, w['steps']):.0f} tokens/step"
                     + (f", GEMM {w['gemm_tflop_per_s']:.0f} TFLOP/s"
                        if w["gemm_tflop_per_s"] is not None else "")))
    shares = ", ".join(f"{c} {100 * v:.1f}%" for c, v in estimate.items() if v > 0)
    rows.append(("run estimate, % of wall", shares or "(no device kernels: CPU run)"))
    out["summary_rows"] = rows
    return out


if __name__ == "__main__":
    sys.exit(main())
