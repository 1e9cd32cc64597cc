"""The CPU platform passes the conformance kit, and the kit catches a broken backend; the
contract stays small, documented and fully checked by the kit, which uses the contract only."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import platforms.interface
from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec, CommonAttentionMetadata, GraphRunner, Platform
from platforms.kernels import KernelImpl
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_communicator,
    check_contract,
    check_device,
    check_events,
    check_graph_runner,
    check_kernel_overrides,
    check_memory_info,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_cpu_graph_runner_equals_eager():
    err = check_graph_runner(CpuPlatform())
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

    def graph_runner(self, forward, config, attention=()):
        return OffByOneRunner(forward, config, attention)


def _bad_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # eps forgotten


class BadKernelPlatform(CpuPlatform):
    name = "badkernel"

    def kernel_overrides(self):
        return [KernelImpl("rms_norm", _bad_norm, priority=5, provider="test")]


def test_kit_fails_a_runner_that_changes_results():
    with pytest.raises(AssertionError, match="differs from eager"):
        check_graph_runner(OffByOnePlatform())


def test_kit_fails_a_kernel_that_drops_eps():
    with pytest.raises(AssertionError, match="rms_norm"):
        check_kernel_overrides(BadKernelPlatform())


def test_cpu_passes_the_contract_check():
    check_contract(CpuPlatform())


class AcceptsAnythingPlatform(CpuPlatform):
    name = "accepts_anything"

    def validate(self, config):
        return []  # wrong: float64 is not in its dtypes


class DtypeOutsideCapabilitiesPlatform(CpuPlatform):
    name = "bad_dtype"

    def resolve_dtype(self, model_dtype):
        return torch.float64


class UnseededPlatform(CpuPlatform):
    name = "unseeded"

    def seed_everything(self, seed):
        pass  # wrong: the global generator keeps running


@pytest.mark.parametrize("platform, member", [
    (AcceptsAnythingPlatform(), "validate"), (DtypeOutsideCapabilitiesPlatform(), "resolve_dtype"),
    (UnseededPlatform(), "seed_everything"),
], ids=["validate", "resolve_dtype", "seed_everything"])
def test_contract_check_names_the_broken_member(platform, member):
    with pytest.raises(AssertionError, match=member):
        check_contract(platform)


def _members() -> list[str]:
    names = [n for n in vars(Platform) if not n.startswith("_")]
    return sorted({*names, *Platform.__annotations__})


def test_the_platform_contract_has_at_most_25_members_each_documented():
    members = _members()
    assert len(members) <= 25, members
    source = inspect.getsource(Platform)
    for name in members:
        member = vars(Platform).get(name)
        func = getattr(member, "__func__", member)
        if callable(func):
            assert inspect.getdoc(func), f"Platform.{name} has no docstring"
        else:  # a class attribute: documented by the comment on its line
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{name}:"))
            assert "#" in line, f"Platform.{name} has no comment saying what it is"
    for field in dataclasses.fields(platforms.interface.Capabilities):
        assert f"    {field.name}:" in inspect.getsource(platforms.interface.Capabilities)


def test_every_contract_member_is_named_by_the_conformance_kit():
    kit = "\n".join(p.read_text() for p in (ROOT / "platforms" / "testing").glob("*.py"))
    words = {n.attr for n in ast.walk(ast.parse(kit)) if isinstance(n, ast.Attribute)}
    missing = [m for m in _members() if m not in words]
    assert not missing, f"members the kit never exercises: {missing}"


def test_the_kit_runs_on_the_contract_alone():
    """No engine module is imported while the kit checks a platform."""
    code = ("import sys\n"
            "from platforms.cpu.platform import CpuPlatform\n"
            "from platforms.testing import check_contract, check_graph_runner\n"
            "check_contract(CpuPlatform()); check_graph_runner(CpuPlatform())\n"
            "print(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
