"""profile_throughput.py's probes: the kernel categoriser on real kernel names, and the step
clock on a real tiny CPU engine (it must time every step, count every token, and leave the
engine's objects as it found them).

Rule: the probes patch live engine objects by attribute name; these tests fail when the
engine renames what they patch, which is when the script needs updating.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def probes():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("throughput_probes")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("name, category", [
    ("_paged_attention_kernel", "attention"),
    ("_allreduce_add_rms_norm_kernel", "all-reduce / gather"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-reduce / gather"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "split-K reduce"),
    ("_merge_splits_kernel", "merge"),
    ("_write_kv_kernel", "kv write"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_"
     "execute_segment_k_off_kernel__5x_cublas", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4>", "gemm"),
    ("_rms_norm_kernel", "norm"),
    ("triton_per_fused_add_mean_mul_pow_rsqrt_0", "norm"),
    ("_rotary_kernel", "rotary"),
    ("_silu_and_mul_kernel", "silu"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
     "at::native::ArgMaxOps<float>, unsigned int, long, 4, 4> >", "sampling"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
     "copies"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
     "true>", "other"),
])
def test_categorize_kernel(probes, name, category):
    assert probes.categorize_kernel(name) == category


def test_group_kernels_sums_calls_and_time_per_category(probes):
    stats = [probes.KernelStat("_paged_attention_kernel", 3, 30.0),
             probes.KernelStat("nvjet_tst_a", 2, 100.0), probes.KernelStat("nvjet_tst_b", 1, 5.0),
             probes.KernelStat("mystery", 4, 1.0)]
    grouped = probes.group_kernels(stats)
    assert list(grouped) == list(probes.CATEGORY_ORDER)
    assert grouped["gemm"] == (3, 105.0)
    assert grouped["attention"] == (3, 30.0)
    assert grouped["other"] == (4, 1.0)
    assert grouped["norm"] == (0, 0.0)


def test_bucket_label(probes):
    assert probes.bucket_label(512, probes.TOKEN_BUCKETS) == "<=512"
    assert probes.bucket_label(513, probes.TOKEN_BUCKETS) == "<=2048"
    assert probes.bucket_label(8193, probes.TOKEN_BUCKETS) == ">8192"


def test_step_clock_times_every_step_of_a_cpu_engine(probes, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_llama8b_config import write_model_dir
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from engine.benchmarks.throughput import Workload
    from engine.entrypoints.llm import LLM

    model = write_model_dir(str(tmp_path / "tiny"), num_hidden_layers=2, hidden_size=64,
                            intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=512)
    llm = LLM(model=model, load_format="dummy", dtype="float32", device="cpu",
              max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)
    runner = llm.core.executor.runner
    objects = (llm.core, llm.core.scheduler, llm.core.executor, runner, runner.input_batch,
               runner.attn_backend, runner.model, llm.output_processor)
    before = [dict(vars(o)) for o in objects]
    prompts = [[5 + i] * (40 + 7 * i) for i in range(6)]  # 40..75 tokens: chunked at 64
    workload = Workload(prompts, [5] * len(prompts))
    sys.path.insert(0, str(SCRIPTS))
    try:
        from profile_throughput import probed_run
    finally:
        sys.path.remove(str(SCRIPTS))
    result, clock = probed_run(llm, llm.core.platform, workload)

    assert clock.skipped == []
    # Each request computes its prompt and all outputs but the last (never fed back).
    expected = sum(len(p) + 5 - 1 for p in prompts)
    assert sum(s.num_tokens for s in clock.steps) == expected
    assert max(s.num_tokens for s in clock.steps) <= 64
    assert sum(s.num_sampled for s in clock.steps) == 5 * len(prompts)
    assert all(s.gpu_forward_ms is not None for s in clock.steps if s.num_tokens)
    totals = clock.piece_seconds(result.seconds)
    assert 0 < totals[probes.STEP] <= result.seconds
    assert totals[probes.FORWARD] > 0 and totals[probes.OUTPUTS] > 0
    for derived in (probes.STEP_REST, probes.EXECUTE_REST, probes.SAMPLING_META):
        assert totals[derived] >= -1e-6, derived  # children never exceed their parent
    # Every patched attribute removed (class methods show again) or restored (same object).
    for obj, old in zip(objects, before):
        assert set(vars(obj)) == set(old), type(obj).__name__
    assert runner.forward is before[3]["forward"] and runner.sampler is before[3]["sampler"]
    assert "step" not in vars(llm.core) and "prepare" not in vars(runner.input_batch)


def test_trace_kernel_stats_counts_device_events_and_merges_overlaps(probes):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "nvjet_a", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "nvjet_a", "ts": 20, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "_paged_attention_kernel", "ts": 25, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 50,
         "dur": 2},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 3},
    ]}
    stats, busy_us = probes.trace_kernel_stats(trace)
    assert [(s.name, s.count, s.device_us) for s in stats] == [
        ("nvjet_a", 2, 20.0), ("_paged_attention_kernel", 1, 10.0),
        ("Memcpy HtoD (Pinned -> Device)", 1, 2.0)]
    assert busy_us == 10 + 15 + 2  # [20, 30) and [25, 35) overlap: 15 us, not 20


def test_choose_windows_takes_the_middle_of_the_longest_run_of_each_kind(probes):
    def step(tokens, reqs):
        return probes.StepRecord(num_tokens=tokens, num_reqs=reqs)

    steps = ([step(8192, 8)] + [step(8192, 100)] * 9          # 0..9 mixed (10)
             + [step(256, 256)] * 20                         # 10..29 decode (20)
             + [step(3000, 200)] * 3 + [step(0, 0)]           # 30..32 mixed, 33 empty
             + [step(200, 200)] * 5)                          # 34..38 decode
    windows = probes.choose_windows(steps, 6)
    assert windows == {"mixed": (2, 6), "decode": (17, 6)}
    assert probes.choose_windows(steps, 50) == {"mixed": (0, 10), "decode": (10, 20)}
    assert probes.choose_windows([step(64, 64)] * 3, 2) == {"decode": (0, 2)}
