"""The CPU platform passes the conformance kit, and the kit catches a broken backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec, CommonAttentionMetadata, GraphRunner
from platforms.kernels import KernelImpl
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_communicator,
    check_device,
    check_events,
    check_graph_runner,
    check_kernel_overrides,
    check_memory_info,
    write_tiny_llama,
)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_cpu_attention_matches_reference(case):
    assert check_attention_against_reference(CpuPlatform(), case) < 1e-4


def test_cases_cover_gqa_ratios_and_head_sizes():
    ratios = {c.num_heads // c.num_kv_heads for c in ATTENTION_CASES}
    assert ratios == {1, 2, 4}
    assert {c.head_size for c in ATTENTION_CASES} == {64, 128}


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_cpu_attention_other_block_sizes(block_size):
    check_attention_against_reference(CpuPlatform(), ATTENTION_CASES[3], block_size=block_size)


def test_cpu_attention_bfloat16_within_its_tolerance():
    err = check_attention_against_reference(CpuPlatform(), ATTENTION_CASES[2], dtype=torch.bfloat16)
    assert 0 < err < 3e-2


def test_cpu_device_and_memory():
    free, total = check_memory_info(CpuPlatform())
    assert total >= free > 0
    check_device(CpuPlatform())


class ContiguousBlocksBackend(CpuAttentionBackend):
    """Wrong on purpose: reads as if each request's blocks were numbered in order."""

    def build_metadata(self, common: CommonAttentionMetadata):
        sorted_table = common.block_table.sort(dim=1).values
        return super().build_metadata(dataclasses.replace(common, block_table=sorted_table))


class ContiguousBlocksPlatform(CpuPlatform):
    name = "broken"

    def attention_backend(self, spec: AttentionSpec):
        return ContiguousBlocksBackend(spec)


class ShortMemoryPlatform(CpuPlatform):
    name = "short"

    def memory_info(self) -> tuple[int, int]:
        return 10, 5


def test_kit_fails_a_backend_that_ignores_block_tables():
    with pytest.raises(AssertionError, match="max abs error"):
        check_attention_against_reference(ContiguousBlocksPlatform(), ATTENTION_CASES[0])


def test_kit_fails_impossible_memory_numbers():
    with pytest.raises(AssertionError, match="free=10, total=5"):
        check_memory_info(ShortMemoryPlatform())


def test_cpu_events_time_queued_work():
    assert check_events(CpuPlatform()) >= 0.0


def test_cpu_graph_runner_equals_eager(tmp_path):
    err = check_graph_runner(CpuPlatform(), write_tiny_llama(tmp_path / "tiny"))
    assert err == 0.0  # the eager runner is the forward itself


def test_cpu_communicator_collectives_across_two_processes():
    check_communicator(CpuPlatform, world_size=2)


def test_cpu_kernel_overrides_match_reference():
    check_kernel_overrides(CpuPlatform())


class OffByOneRunner(GraphRunner):
    """Wrong on purpose: scales its output slightly, as a stale captured graph would."""

    def __call__(self, input_ids, positions, attn_metadata):
        out = self.forward(input_ids, positions, attn_metadata)
        return out * 1.001


class OffByOnePlatform(CpuPlatform):
    name = "offbyone"

    def graph_runner(self, forward, config):
        return OffByOneRunner(forward, config)


def _bad_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # eps forgotten


class BadKernelPlatform(CpuPlatform):
    name = "badkernel"

    def kernel_overrides(self):
        return [KernelImpl("rms_norm", _bad_norm, priority=5, provider="test")]


def test_kit_fails_a_runner_that_changes_results(tmp_path):
    with pytest.raises(AssertionError, match="differs from eager"):
        check_graph_runner(OffByOnePlatform(), write_tiny_llama(tmp_path / "tiny"))


def test_kit_fails_a_kernel_that_drops_eps():
    with pytest.raises(AssertionError, match="rms_norm"):
        check_kernel_overrides(BadKernelPlatform())
