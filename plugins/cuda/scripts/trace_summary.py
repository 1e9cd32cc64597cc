"""Where the device time of a profiled run goes, from a torch.profiler Chrome trace (the
`rankN.json.gz` files `LLM.start_profile` writes): device busy against idle, kernel time by
category, and the idle gaps by the kernel that ends them.

    python plugins/cuda/scripts/trace_summary.py TRACE [TRACE ...] [--steps N]

`--steps` divides the totals by a step count (e.g. the tokens of a batch-1 generate), so the
table reads per step. Categories and busy time are `throughput_probes`' (the throughput
profiler's); anything unmatched is "other", listed by name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput_probes as probes  # noqa: E402  (the kernel categories and busy time)


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"traceEvents": data}


def summarize(path: Path, steps: int) -> str:
    trace = load(path)
    device = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                     and e.get("cat") in probes.DEVICE_TRACE_CATEGORIES), key=lambda e: e["ts"])
    if not device:
        return f"{path}: no device events (was the profile recorded on a GPU?)"
    stats, busy = probes.trace_kernel_stats(trace)
    start = device[0]["ts"]
    span = max(e["ts"] + e["dur"] for e in device) - start
    gaps_by_next: Counter = Counter()
    gap_counts: Counter = Counter()
    cursor = start
    for e in device:  # a gap (no device work) is charged to the event that ends it
        if e["ts"] - cursor > 2.0:  # launch latency inside a graph is ~1-2 us
            key = probes.categorize_kernel(e["name"]) + ": " + e["name"][:60]
            gaps_by_next[key] += e["ts"] - cursor
            gap_counts[key] += 1
        cursor = max(cursor, e["ts"] + e["dur"])
    per = max(steps, 1)
    lines = [f"== {path}",
             f"device span {span / 1000:.3f} ms, busy {busy / 1000:.3f} ms "
             f"({100 * busy / span:.1f}%), idle {(span - busy) / 1000:.3f} ms"
             + (f"; per step ({steps}): span {span / per:.1f} us, busy {busy / per:.1f} us"
                if steps else ""),
             f"{'category':24s} {'us/step':>10s} {'kernels/step':>13s}"]
    grouped = probes.group_kernels(stats)
    for cat, (calls, us) in sorted(grouped.items(), key=lambda kv: -kv[1][1]):
        if calls:
            lines.append(f"{cat:24s} {us / per:10.1f} {calls / per:13.1f}")
    lines.append("idle gaps > 2 us, by the event that ends them (us/step, count/step):")
    for key, us in gaps_by_next.most_common(12):
        lines.append(f"  {us / per:9.1f} {gap_counts[key] / per:7.1f}  {key}")
    other = [st for st in stats if st.category == "other"][:8]
    if other:
        lines.append("other kernels (us/step):")
        lines += [f"  {st.device_us / per:9.1f}  {st.name[:80]}" for st in other]
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
