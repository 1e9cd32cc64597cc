"""Where the device time of a profiled run goes, from a torch.profiler Chrome trace (the
`rankN.json.gz` files `LLM.start_profile` writes): device busy against idle, kernel time by
category, and the idle gaps by the kernel that ends them.

    python plugins/cuda/scripts/trace_summary.py TRACE [TRACE ...] [--steps N]

`--steps` divides the totals by a step count (e.g. the tokens of a batch-1 generate), so the
table reads per step. The categories are regexes over kernel names; anything unmatched is
"other", listed by name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

CATEGORIES = (
    ("all-reduce / gather", r"one_shot|two_shot|allreduce|all_reduce|AllReduce|AllGather|"
                            r"ReduceScatter|nccl|symm|multimem"),
    ("attention", r"paged|attn|attention|merge_states|_merge|flash|fmha"),
    ("split-K reduce", r"splitKreduce"),   # cuBLAS's reduce after a split-K GEMM
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90|sm80|ampere|hopper|cublas|Kernel2"),
    ("rmsnorm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("silu", r"silu|swiglu|act"),
    ("kv write", r"reshape_and_cache|kv_write|store_kv|slot"),
    ("sampling / argmax", r"argmax|argMax|topk|sort|softmax|gumbel|sample|max_"),
    ("elementwise / copy", r"elementwise|vectorized|copy|fill|cat|index|unrolled|reduce"),
)
_COMPILED = [(name, re.compile(rx)) for name, rx in CATEGORIES]


def category(kernel: str) -> str:
    for name, rx in _COMPILED:
        if rx.search(kernel):
            return name
    return "other"


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(path: Path, steps: int) -> str:
    events = load(path)
    device = [e for e in events if e.get("ph") == "X"
              and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not device:
        return f"{path}: no device events (was the profile recorded on a GPU?)"
    device.sort(key=lambda e: e["ts"])
    start = device[0]["ts"]
    end = max(e["ts"] + e["dur"] for e in device)
    span = end - start
    busy = 0.0
    gaps_by_next: Counter = Counter()
    gap_counts: Counter = Counter()
    cursor = start
    for e in device:  # union of intervals; a gap is charged to the event that ends it
        s, f = e["ts"], e["ts"] + e["dur"]
        if s > cursor:
            gap = s - cursor
            if gap > 2.0:  # launch latency inside a graph is ~1-2 us; count real waits
                key = category(e["name"]) + ": " + e["name"][:60]
                gaps_by_next[key] += gap
                gap_counts[key] += 1
        if f > cursor:
            busy += f - max(s, cursor)
            cursor = f
    by_cat: dict[str, float] = defaultdict(float)
    counts: Counter = Counter()
    other: Counter = Counter()
    for e in device:
        cat = e["cat"] if e["cat"] != "kernel" else category(e["name"])
        by_cat[cat] += e["dur"]
        counts[cat] += 1
        if cat == "other":
            other[e["name"][:80]] += e["dur"]
    per = max(steps, 1)
    lines = [f"== {path}",
             f"device span {span / 1000:.3f} ms, busy {busy / 1000:.3f} ms "
             f"({100 * busy / span:.1f}%), idle {(span - busy) / 1000:.3f} ms"
             + (f"; per step ({steps}): span {span / per:.1f} us, busy {busy / per:.1f} us"
                if steps else ""),
             f"{'category':24s} {'us/step':>10s} {'kernels/step':>13s}"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:24s} {us / per:10.1f} {counts[cat] / per:13.1f}")
    lines.append("idle gaps > 2 us, by the event that ends them (us/step, count/step):")
    for key, us in gaps_by_next.most_common(12):
        lines.append(f"  {us / per:9.1f} {gap_counts[key] / per:7.1f}  {key}")
    if other:
        lines.append("other kernels (us/step):")
        for name, us in other.most_common(8):
            lines.append(f"  {us / per:9.1f}  {name}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args(argv)
    for path in args.traces:
        print(summarize(path, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
