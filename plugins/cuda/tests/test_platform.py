"""CudaPlatform: selection, dtype and validation rules, cheap discovery, the kernel table and
the profiling step on CPU; device, memory, events, attention and NCCL checks on a GPU.

Rule: everything that is not device-specific runs on CPU; GPU tests skip with a reason.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import engine_cuda
import pytest
import torch
from engine_cuda.platform import TRITON_KERNELS, CudaPlatform

from engine.engine_args import EngineArgs
from platforms.cpu.platform import CpuPlatform
from platforms.kernels import REFERENCE, resolve_kernels
from platforms.testing import write_tiny_llama

HAS_CUDA = CudaPlatform.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda)")
PLUGIN_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
    """The engine's config of a tiny Llama (bfloat16, max_num_seqs filled as the core does)."""
    args = {"block_size": 16, "max_model_len": 256, **overrides.pop("args", {})}
    directory = write_tiny_llama(tmp_path / "tiny", **overrides)
    config = EngineArgs(model=str(directory), load_format="dummy", **args).create_config()
    sched = config.scheduler
    if sched.max_num_seqs is None:
        sched = dataclasses.replace(
            sched, max_num_seqs=CudaPlatform.capabilities.default_max_num_seqs)
    return dataclasses.replace(config, scheduler=sched,
                               model=dataclasses.replace(config.model, dtype=torch.bfloat16))


def platform_config(tmp_path, **overrides):
    """What the CUDA platform is told about that engine."""
    return tiny_config(tmp_path, **overrides).for_platform()


# ---- selection and discovery ----
def test_hook_offers_the_platform_and_its_identity():
    assert engine_cuda.engine_platforms() == [CudaPlatform]
    assert (CudaPlatform.name, CudaPlatform.device_type) == ("cuda", "cuda")
    assert CudaPlatform.priority > CpuPlatform.priority
    caps = CudaPlatform.capabilities
    assert caps.graph_capture and caps.measures_peak_memory and caps.executes_asynchronously
    assert caps.distributed_backend == "nccl" and caps.ray_device_resource == "GPU"


def test_a_rocm_build_of_torch_never_selects_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert CudaPlatform.is_available()
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert not CudaPlatform.is_available()


def test_discovery_and_describe_import_no_triton_and_start_no_cuda():
    code = (
        "import sys, torch, engine_cuda\n"
        "cls, = engine_cuda.engine_platforms()\n"
        "cls.is_available(); info = cls().describe()\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print(info['kernels'])\n"
    )
    env = {**os.environ, "PYTHONPATH": PLUGIN_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rms_norm" in proc.stdout and "triton" in proc.stdout


def test_describe_states_capabilities():
    info = CudaPlatform().describe()
    assert info["head_sizes"] == "16, 32, 64, 128, 256"
    assert info["collectives"] == "nccl"
    assert "bfloat16" in info["dtypes"] and "512" in info["graph_capture"]
    assert set(TRITON_KERNELS) <= set(info["kernels"].replace(",", " ").split())


# ---- config ----
@pytest.mark.parametrize("checkpoint, expected", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
])
def test_resolve_dtype_keeps_half_checkpoints_and_halves_float32(checkpoint, expected):
    if HAS_CUDA and not torch.cuda.is_bf16_supported() and expected is torch.bfloat16:
        expected = torch.float16
    assert CudaPlatform().resolve_dtype(checkpoint) == expected


def test_validate_names_each_problem_with_the_flag(tmp_path, monkeypatch):
    platform = CudaPlatform()
    monkeypatch.setattr(CudaPlatform, "is_available", classmethod(lambda cls: True))
    monkeypatch.setattr(CudaPlatform, "device_count", lambda self: 1)
    good = platform_config(tmp_path)
    assert platform.validate(good) == []

    problems = platform.validate(platform_config(tmp_path, head_dim=48))
    assert len(problems) == 1 and "head size 48" in problems[0] and "--device" in problems[0]

    problems = platform.validate(platform_config(tmp_path, num_attention_heads=6,
                                                 hidden_size=192, num_key_value_heads=4,
                                                 head_dim=32))
    assert any("6 query heads" in p and "4 KV heads" in p for p in problems)

    f64 = dataclasses.replace(good, dtype=torch.float64)
    assert any("float64" in p and "--dtype" in p for p in platform.validate(f64))


def test_validate_counts_gpus_for_the_parallel_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(CudaPlatform, "is_available", classmethod(lambda cls: True))
    monkeypatch.setattr(CudaPlatform, "device_count", lambda self: 2)
    config = tiny_config(tmp_path)
    four = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel,
                                                                    tensor_parallel_size=4))
    problems = CudaPlatform().validate(four.for_platform())
    assert any("4 GPUs are needed" in p and "2 are visible" in p for p in problems)


def test_validate_refuses_a_decode_block_table_too_large_to_capture(tmp_path, monkeypatch):
    monkeypatch.setattr(CudaPlatform, "is_available", classmethod(lambda cls: True))
    monkeypatch.setattr(CudaPlatform, "device_count", lambda self: 1)
    huge = platform_config(tmp_path, max_position_embeddings=1 << 30,
                           args={"max_model_len": 1 << 30, "block_size": 1,
                                 "max_num_seqs": 512})
    problems = CudaPlatform().validate(huge)
    assert any("block table" in p and "--enforce-eager" in p for p in problems)
    eager = dataclasses.replace(huge, enforce_eager=True)
    assert not any("block table" in p for p in CudaPlatform().validate(eager))


def test_kv_cache_budget_takes_an_explicit_budget_as_given():
    from engine.worker.model_runner import kv_cache_budget

    assert kv_cache_budget(CudaPlatform(), 12345, 0.9, model_bytes=10**9) == 12345


# ---- kernels ----
def test_kernel_table_picks_triton_on_cuda_and_the_reference_on_cpu():
    pytest.importorskip("triton")
    impls = CudaPlatform().kernel_overrides()
    assert sorted(i.name for i in impls) == sorted(TRITON_KERNELS)
    on_cuda = resolve_kernels("cuda", impls)
    on_cpu = resolve_kernels("cpu", impls)
    for name, module in TRITON_KERNELS.items():
        assert on_cuda[name].__module__ == module, name
        assert on_cuda.providers[name] == "engine-cuda (triton)"
        assert on_cpu[name] is REFERENCE[name]


# ---- the profiling step that sizes the KV cache (any platform that measures) ----
class _MeasuringCpu(CpuPlatform):
    """The CPU platform, claiming to measure peak memory (a 4 MiB device whose profiling
    step peaked at 1 MiB), logging the runner's calls."""

    capabilities = dataclasses.replace(CpuPlatform.capabilities, measures_peak_memory=True,
                                       default_kv_cache_memory=None)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reset_peak_memory(self) -> None:
        self.calls.append("reset")

    def peak_memory_bytes(self) -> int:
        self.calls.append("peak")
        return 1 << 20

    def memory_info(self) -> tuple[int, int]:
        return 1 << 22, 1 << 22

    def execute_calls(self, runner):
        original = runner.execute_model

        def counting(out):
            self.calls.append(f"step {out.total_num_scheduled_tokens} tokens "
                              f"{len(out.num_scheduled_tokens)} requests")
            return original(out)

        runner.execute_model = counting


def test_profile_step_runs_full_size_before_the_budget_and_leaves_nothing_behind(tmp_path):
    from engine.engine_core.core import resolve_for_platform
    from engine.models.layers.attention import Attention
    from engine.worker.model_runner import ModelRunner

    platform = _MeasuringCpu()
    config = tiny_config(tmp_path, args={"max_num_batched_tokens": 100, "max_num_seqs": 8,
                                         "max_model_len": 64, "gpu_memory_utilization": 0.5})
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=None))
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    runner.load_model()
    platform.execute_calls(runner)
    num_blocks = runner.determine_num_blocks()
    assert platform.calls == ["reset", "step 100 tokens 8 requests", "peak", "peak"]
    # total x utilization - the step's peak: 4 MiB x 0.5 - 1 MiB
    assert num_blocks == (1 << 20) // runner.bytes_per_block
    assert runner.input_batch.requests == {}
    assert all(m.kv_cache is None for m in runner.model.modules() if isinstance(m, Attention))


def test_no_profile_step_when_the_budget_is_given(tmp_path):
    from engine.engine_core.core import resolve_for_platform
    from engine.worker.model_runner import ModelRunner

    platform = _MeasuringCpu()
    config = tiny_config(tmp_path, args={"kv_cache_memory": 1 << 20})
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=None))
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    runner.load_model()
    runner.determine_num_blocks()
    assert "reset" not in platform.calls


def test_kv_cache_summary_line():
    from engine.engine_core.core import kv_cache_summary

    class Cfg:  # only the fields the summary reads
        class model:  # noqa: N801
            dtype, num_layers, num_kv_heads, head_dim = torch.bfloat16, 32, 8, 128

        class cache:  # noqa: N801
            block_size = 16

        class scheduler:  # noqa: N801
            max_model_len = 8192

    line = kv_cache_summary(Cfg, 12345)
    # 12345 blocks x 16 tokens x 128 KiB per token (2 x 32 x 8 x 128 x 2 bytes)
    assert line == "KV cache: 12345 blocks (24.1 GiB); 24.1x concurrency at max_model_len 8192"


# ---- on a GPU ----
@needs_gpu
def test_gpu_device_memory_events_and_seeding():
    from platforms.testing import check_device, check_events, check_memory_info

    platform = CudaPlatform()
    check_device(platform)
    free, total = check_memory_info(platform)
    check_events(platform)
    platform.reset_peak_memory()
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    peak = platform.peak_memory_bytes()
    assert peak >= x.numel() and peak <= total, (peak, total)
    del x


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_gpu_attention_passes_the_kit(dtype):
    from platforms.testing import ATTENTION_CASES, check_attention_against_reference

    for case in ATTENTION_CASES:
        check_attention_against_reference(CudaPlatform(), case, dtype=dtype)


@needs_gpu
def test_gpu_kernel_overrides_pass_the_kit():
    from platforms.testing import check_kernel_overrides

    check_kernel_overrides(CudaPlatform(), dtypes=(torch.float32, torch.bfloat16))


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                    reason="needs 2 NVIDIA GPUs for NCCL collectives")
def test_gpu_nccl_collectives_across_two_processes():
    from platforms.testing import check_communicator

    check_communicator(CudaPlatform, world_size=2)
