"""The Ascend platform without an NPU: selection, entry point, validation, description; the
metadata in the ops' layout, decode padding, the rotary glue and the ACL-graph runner's own
logic on the CPU, with the attention ops replaced by a stand-in written from their documented
meaning (tests/npu_emulation.py); the hardware parts skipped with the reason."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util

import pytest
import torch
from engine_ascend import platform as ascend
from engine_ascend.attention import AscendAttentionBackend, build_ascend_metadata
from engine_ascend.graph import AclGraphRunner, EagerReplay, capture_sizes
from engine_ascend.ops import neox_cos_sin
from npu_emulation import EmulatedNpuOps

from platforms import kernels
from platforms.interface import CommonAttentionMetadata, DeviceEvent
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_graph_runner,
    check_kernel_overrides,
    make_platform_config,
)

needs_npu = pytest.mark.skipif(
    not ascend.AscendPlatform.is_available(),
    reason="needs an Ascend NPU with torch_npu and CANN (not installable here)")


class AscendCpuStandIn(ascend.AscendPlatform):
    """This plugin's attention backend, metadata and graph runner on the host, with the two
    vendor attention calls emulated and eager replay instead of ACL graphs."""

    name = "ascend_cpu_standin"
    device_type = "cpu"
    priority = -1
    capabilities = dataclasses.replace(ascend.AscendPlatform.capabilities,
                                       dtypes=(torch.float32,), measures_peak_memory=False)

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_info(self) -> tuple[int, int]:
        return 1 << 30, 1 << 30

    def synchronize(self) -> None:
        pass

    def create_event(self) -> DeviceEvent:
        return DeviceEvent()

    def kernel_overrides(self):
        return []  # the torch_npu kernels need an NPU

    def attention_backend(self, spec):
        return AscendAttentionBackend(spec, ops=EmulatedNpuOps())

    def graph_runner(self, forward, config, attention=()):
        return AclGraphRunner(forward, config, attention, make_graph=EagerReplay)


def _common(q_lens, computed, tables, slots) -> CommonAttentionMetadata:
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor([c + q for c, q in zip(computed, q_lens)], dtype=torch.int32)
    table = torch.tensor(tables, dtype=torch.int32)
    return CommonAttentionMetadata(
        num_reqs=len(q_lens), num_actual_tokens=sum(q_lens), max_query_len=max(q_lens),
        max_seq_len=int(seq.max()), query_start_loc_cpu=qsl, seq_lens_cpu=seq,
        num_computed_tokens_cpu=torch.tensor(computed, dtype=torch.int32), query_start_loc=qsl,
        seq_lens=seq, block_table=table, slot_mapping=torch.tensor(slots))


def test_not_selected_without_an_npu():
    installed = importlib.util.find_spec("torch_npu") is not None
    assert ascend.AscendPlatform.is_available() is (installed and ascend.npu_available())
    if not installed:
        assert not ascend.AscendPlatform.is_available()


def test_entry_point_and_capabilities():
    eps = {e.name: e for e in importlib.metadata.entry_points(group="engine.plugins")}
    assert eps["ascend"].value == "engine_ascend" and eps["ascend"].dist.name == "engine-ascend"
    info = ascend.AscendPlatform().describe()
    assert info["device_type"] == "npu" and info["collectives"] == "hccl"
    assert "silu_and_mul" in info["kernels"] and "torch_npu" in info["attention"]


def test_kernel_overrides_are_torch_npu_ops_for_ascend_only():
    impls = ascend.AscendPlatform().kernel_overrides()
    # torch_npu has no gelu-tanh-and-mul, bitmask, MoE or LoRA op here: those stay the
    # reference.
    assert {i.name for i in impls} == set(kernels.KERNEL_NAMES) - {
        "apply_token_bitmask", "gelu_tanh_and_mul", "moe_select_experts", "fused_experts",
        "fused_moe", "lora_shrink", "lora_expand"}
    assert all(i.platforms == frozenset({"ascend"}) and i.priority > 0 for i in impls)
    table = kernels.resolve_kernels("cpu", impls)  # never picked up on another platform
    assert all(table.providers[n] == "reference" for n in kernels.KERNEL_NAMES)


def test_validate_block_size_alignment():
    config = make_platform_config(dtype=torch.bfloat16, block_size=24)
    problems = ascend.AscendPlatform().validate(config)
    assert any("block size 24" in p and "--block-size" in p for p in problems)
    config = dataclasses.replace(config, block_size=128)
    assert ascend.AscendPlatform().validate(config) == []


def test_metadata_in_the_ops_layout():
    common = _common([3, 1], [0, 5], [[4, 0], [2, 7]], [64, 65, 66, 117])
    md = build_ascend_metadata(common, block_size=16)
    assert md.query_ends == (3, 4) and md.kv_lens == (3, 6) and not md.decode_only
    assert md.block_table.dtype == torch.int32 and md.block_table.tolist() == [[5, 1], [3, 8]]
    assert md.slot_mapping.dtype == torch.int32
    assert md.slot_mapping.tolist() == [80, 81, 82, 133]  # past the scratch block


def test_decode_padding_reads_and_writes_only_the_scratch_block():
    md = build_ascend_metadata(_common([1, 1], [4, 9], [[1], [2]], [20, 41]), block_size=16)
    assert md.decode_only
    padded = md.padded_decode(4)
    assert padded.num_reqs == 4 and padded.num_actual_tokens == 4
    assert padded.block_table.tolist() == [[2], [3], [0], [0]]
    assert padded.slot_mapping.tolist() == [36, 57, 0, 0]
    assert padded.seq_lens.tolist() == [5, 10, 1, 1] and padded.kv_lens == (5, 10, 1, 1)
    assert padded.query_ends == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="down to 1"):
        md.padded_decode(1)


def test_rotary_glue_matches_the_reference():
    """npu_rotary_mul computes x * cos + rotate_half(x) * sin (its documented formula); with
    the glue's cos/sin that is the engine's neox rotary."""
    gen = torch.Generator().manual_seed(0)
    t, h, d = 5, 3, 8
    q = torch.randn(t, h, d, generator=gen)
    cache = torch.randn(32, d, generator=gen)
    positions = torch.tensor([0, 3, 7, 2, 31])
    cos, sin = neox_cos_sin(cache, positions, q.dtype)
    x = q.unsqueeze(0)
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    got = (x * cos + half * sin).squeeze(0)
    want, _ = kernels.rotary_embedding(positions, q, q.clone(), cache)
    torch.testing.assert_close(got, want)


def test_capture_sizes():
    assert capture_sizes(6) == (1, 2, 4, 6)
    assert capture_sizes(512) == (1, 2, 4, 8, 16, 32, 64, 128)


@pytest.mark.parametrize("case", ATTENTION_CASES[:4], ids=lambda c: c.id)
def test_attention_on_the_cpu_stand_in(case):
    check_attention_against_reference(AscendCpuStandIn(), case)


def test_acl_graph_runner_on_the_cpu_stand_in_matches_eager():
    worst = check_graph_runner(AscendCpuStandIn())
    assert worst < 1e-4


@needs_npu
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_attention_on_an_npu(case):
    check_attention_against_reference(ascend.AscendPlatform(), case, dtype=torch.float16)


@needs_npu
def test_kernel_overrides_on_an_npu():
    check_kernel_overrides(ascend.AscendPlatform(), dtypes=(torch.float16,))
