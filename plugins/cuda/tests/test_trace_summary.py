"""trace_summary on a small Chrome trace written here: busy and idle time, categories, and
idle gaps charged to the kernel that ends them."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import trace_summary  # noqa: E402


def test_summary_of_two_steps(tmp_path):
    events, t = [], 0
    for _ in range(2):  # a step: GEMM 50 us, fused all-reduce 8, attention 5; 100 us host gap
        for name, dur in (("nvjet_sm90_tst_64x8_splitK_TNT", 50), ("cublasLt::splitKreduce", 2),
                          ("_allreduce_add_rms_norm_kernel", 8), ("_paged_attention_kernel", 5)):
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": dur})
            t += dur + 1
        t += 100
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999})
    path = tmp_path / "rank0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = trace_summary.summarize(path, steps=2)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert "busy 0.130 ms" in text  # 2 x 65 us of kernels; host ops do not count
    assert rows["gemm"][1:] == ["50.0", "1.0"]           # a split-K GEMM is a GEMM
    assert rows["split-K"][2:] == ["2.0", "1.0"]          # its reduce is apart
    assert rows["all-reduce"][3:] == ["8.0", "1.0"]
    assert "50.5     0.5  gemm" in text  # the 101 us gap, once in two steps, before the GEMM
