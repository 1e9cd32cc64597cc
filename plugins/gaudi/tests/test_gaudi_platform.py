"""The Gaudi platform without a Gaudi: selection, entry point, validation, description; the
HPU-graph bucket runner's own logic (padding, static buffers refilled per step, buckets reused)
through the conformance kit's graph check on a CPU stand-in that replays eagerly; the
hardware parts skipped with the reason."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch
from engine_gaudi import platform as gaudi
from engine_gaudi.graph import EagerReplay, HpuGraphBucketRunner

from platforms.interface import DeviceEvent
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_graph_runner,
    make_platform_config,
)

needs_gaudi = pytest.mark.skipif(
    not gaudi.GaudiPlatform.is_available(),
    reason="needs a Gaudi and habana_frameworks (the Gaudi software stack; not on PyPI)")


class GaudiCpuStandIn(gaudi.GaudiPlatform):
    """The Gaudi platform's own attention, buckets and runner, on the host: tensors on the CPU
    and eager replay on the static buffers instead of HPU graphs."""

    name = "gaudi_cpu_standin"
    device_type = "cpu"
    priority = -1

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_info(self) -> tuple[int, int]:
        return 1 << 30, 1 << 30

    def synchronize(self) -> None:
        pass

    def create_event(self) -> DeviceEvent:
        return DeviceEvent()

    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def graph_factory(self, config):
        return EagerReplay


def _config(seqs: int, tokens: int, model_len: int, block_size: int = 16):
    return make_platform_config(dtype=torch.bfloat16, max_num_seqs=seqs,
                                max_num_batched_tokens=tokens, max_model_len=model_len,
                                block_size=block_size)


def test_not_selected_without_a_gaudi():
    # habana_frameworks is not on PyPI; where it is absent nothing of it is imported.
    installed = importlib.util.find_spec("habana_frameworks") is not None
    assert gaudi.GaudiPlatform.is_available() is (installed and gaudi.hpu_available())
    if not installed:
        assert not gaudi.GaudiPlatform.is_available()


def test_entry_point_and_capabilities():
    eps = {e.name: e for e in importlib.metadata.entry_points(group="engine.plugins")}
    assert eps["gaudi"].value == "engine_gaudi" and eps["gaudi"].dist.name == "engine-gaudi"
    info = gaudi.GaudiPlatform().describe()
    assert info["device_type"] == "hpu" and info["collectives"] == "hccl"
    assert "HPU graphs per padded bucket" in info["graph_capture"]


def test_buckets_start_prefill_chunks_at_128():
    limits = gaudi.GaudiPlatform().bucket_limits(_config(8, 512, 1024))
    assert limits.query_buckets == (1, 128, 256, 512)
    assert limits.batch_buckets == (1, 2, 4, 8)
    assert limits.block_buckets == (1, 2, 4, 8, 16, 32, 64)


def test_validate_bounds_the_number_of_graphs():
    platform = gaudi.GaudiPlatform()
    assert platform.validate(_config(8, 512, 1024)) == []
    problems = platform.validate(_config(1024, 65536, 131072))
    assert any("HPU graphs" in p and "--max-num-seqs" in p for p in problems), problems
    fp16 = dataclasses.replace(_config(8, 512, 1024), dtype=torch.float16)
    problems = platform.validate(fp16)
    assert any("dtype float16 is not supported on gaudi" in p for p in problems)


def test_graph_runner_on_the_cpu_stand_in_matches_eager():
    platform = GaudiCpuStandIn()
    worst = check_graph_runner(platform)
    assert worst < 1e-4


def test_runner_refills_static_buffers_and_reuses_buckets():
    """Two steps in one bucket: the second replays the first's graph on its own data."""
    from platforms.interface import AttentionSpec, CommonAttentionMetadata
    from platforms.static_attention import StaticPagedAttentionBackend

    backend = StaticPagedAttentionBackend(AttentionSpec(2, 2, 4, torch.float32, 4))
    built = []

    def forward(ids, pos, md):
        return (ids * 100 + pos)[:, None].float() + md.slot_mapping[:, None].float() / 1000

    def make_graph(fn):
        built.append(fn)
        return EagerReplay(fn)

    config = _config(4, 32, 64, block_size=4)
    runner = HpuGraphBucketRunner(forward, config,
                                  limits=gaudi.GaudiPlatform().bucket_limits(config),
                                  make_graph=make_graph)

    def step(ids, pos, slots):
        n = len(ids)
        qsl = torch.arange(n + 1, dtype=torch.int32)
        seq = torch.tensor(pos, dtype=torch.int32) + 1
        common = CommonAttentionMetadata(
            num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=int(seq.max()),
            query_start_loc_cpu=qsl, seq_lens_cpu=seq, num_computed_tokens_cpu=seq - 1,
            query_start_loc=qsl, seq_lens=seq, block_table=torch.tensor([[1], [2], [3]][:n],
                                                                        dtype=torch.int32),
            slot_mapping=torch.tensor(slots))
        return runner(torch.tensor(ids), torch.tensor(pos), backend.build_metadata(common))

    first = step([5, 6, 7], [1, 2, 3], [5, 9, 14])
    second = step([8, 9, 4], [0, 3, 2], [4, 11, 14])
    assert len(built) == 1 and len(runner.buckets) == 1  # one bucket (4 x 1 x 1), reused
    assert first[:, 0].tolist() == pytest.approx([501.006, 602.010, 703.015])
    assert second[:, 0].tolist() == pytest.approx([800.005, 903.012, 402.015])


@needs_gaudi
@pytest.mark.parametrize("case", ATTENTION_CASES[:3], ids=lambda c: c.id)
def test_attention_on_a_gaudi(case):
    check_attention_against_reference(gaudi.GaudiPlatform(), case, dtype=torch.bfloat16)


@needs_gaudi
def test_hpu_graphs_on_a_gaudi():
    check_graph_runner(gaudi.GaudiPlatform(), dtype=torch.bfloat16)
