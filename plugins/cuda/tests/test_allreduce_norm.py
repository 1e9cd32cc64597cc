"""The fused all-reduce + residual add + RMSNorm kernel.

Rule: on CPU (Triton's interpreter) a group of one rank runs the whole kernel: the push into
its own buffer, the flag, the wait, the sum and the norm, checked against the reference on
fresh random inputs over many calls (both buffer phases, rows whose counters differ); the
eligibility rules are checked without a GPU; two GPUs run the real group
(allreduce_check's `_fused_norm`, through test_symm_allreduce's GPU test).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_cuda.allreduce_norm import MAX_ROWS, SLOT_BYTES, FusedAllReduceNorm, buffer_bytes

from platforms.kernels import REFERENCE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def group_of_one(max_bytes: int = 1 << 20) -> FusedAllReduceNorm:
    """A one-rank group over a plain buffer: its only peer is itself."""
    buffer = torch.zeros(buffer_bytes(1)[1], dtype=torch.uint8, device=DEVICE)
    handle = SimpleNamespace(buffer_ptrs=[buffer.data_ptr()])
    return FusedAllReduceNorm(buffer, handle, rank=0, world_size=1, max_bytes=max_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_rank_group_equals_add_then_norm_over_many_calls(dtype):
    fused = group_of_one()
    ref = REFERENCE["fused_add_rms_norm"]
    gen = torch.Generator().manual_seed(7)
    hidden = 96  # not a power of two: the masked tail
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEVICE)
    for rows in (1, 3, 1, 2, 3):  # row 0 runs five times, row 2 twice: counters differ
        x = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
        residual = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
        want_n, want_s = ref(x, residual, weight, 1e-6)
        got_n, got_s = fused(x, residual, weight, 1e-6)
        torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
        torch.testing.assert_close(got_n, want_n, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-5)
    counters = fused._counters[:3].tolist()
    assert counters == [5, 3, 2], counters  # one epoch per call of each row's program


def test_eligibility_reads_only_shapes_and_dtypes():
    fused = group_of_one(max_bytes=64 * 1024)
    w = torch.ones(4096, device=DEVICE)

    def ok(rows, hidden=4096, dtype=torch.bfloat16, res_dtype=None):
        x = torch.empty(rows, hidden, dtype=dtype, device=DEVICE)
        r = torch.empty(rows, hidden, dtype=res_dtype or dtype, device=DEVICE)
        return fused.can_fuse(x, r, w[:hidden] if hidden <= 4096 else torch.ones(hidden))

    assert ok(1) and ok(8)
    assert not ok(9)                      # 9 x 8 KiB > the 64 KiB ceiling
    assert not ok(0)
    assert not ok(1, dtype=torch.int32)
    assert not ok(1, res_dtype=torch.float32)
    assert not ok(1, hidden=SLOT_BYTES)   # a bf16 row larger than its slot
    assert MAX_ROWS >= 64
