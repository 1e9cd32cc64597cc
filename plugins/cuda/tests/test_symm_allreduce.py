"""The symmetric-memory all-reduce: the decisions on CPU, the whole path on 2 GPUs.

Rule: what decides the path (setup facts, dtype, size, environment) is checked without a GPU;
the collective itself only runs where two GPUs exist (allreduce_check's core).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from engine_cuda import symm_allreduce as sar
from engine_cuda.symm_allreduce import RankFacts, is_eligible, parse_max_bytes, setup_problems

MIB = 1024 * 1024


def facts(n: int = 2, **change) -> list[RankFacts]:
    base = dict(hostname="host", env_value=None, has_ops=True, max_bytes=MIB)
    return [RankFacts(device_uuid=f"GPU-{i}", **{**base, **change}) for i in range(n)]


def test_module_turns_multicast_off_before_any_allocation():
    assert os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"


@pytest.mark.parametrize("world", [2, 4, 8])
def test_setup_goes_ahead_on_one_host_with_distinct_gpus(world):
    assert setup_problems(world, facts(world)) == []


@pytest.mark.parametrize("world", [0, 1, 3 * 3])
def test_setup_refuses_world_sizes_without_a_kernel(world):
    problems = setup_problems(world, facts(max(world, 1)))
    assert len(problems) == 1 and f"{world} ranks" in problems[0]


def test_setup_refuses_each_missing_condition_with_its_reason():
    cases = {
        "ENGINE_CUSTOM_ALLREDUCE=0": facts(env_value="0"),
        "no torch.ops.symm_mem": facts(has_ops=False),
        "several hosts": [facts()[0], RankFacts("other", "GPU-1", None, True, MIB)],
        "share one GPU": [facts()[0], RankFacts("host", "GPU-0", None, True, MIB)],
        "invalid": [facts()[0], RankFacts("host", "GPU-1", None, True, -1)],
        "disagree": [facts()[0], RankFacts("host", "GPU-1", None, True, 2 * MIB)],
    }
    for needle, rank_facts in cases.items():
        problems = setup_problems(2, rank_facts)
        assert any(needle in p for p in problems), (needle, problems)
    # one rank with the variable off turns it off for all
    mixed = [facts()[0], RankFacts("host", "GPU-1", "0", True, MIB)]
    assert setup_problems(2, mixed) == ["ENGINE_CUSTOM_ALLREDUCE=0"]
    assert setup_problems(2, facts(env_value="1")) == []


def test_default_ceiling_shrinks_with_more_peers():
    assert sar.default_max_bytes(2) == MIB
    assert sar.default_max_bytes(2) > sar.default_max_bytes(4) > sar.default_max_bytes(8)


def test_max_bytes_comes_from_the_variable_in_kib():
    assert parse_max_bytes(None, 2) == MIB
    assert parse_max_bytes("", 4) == sar.default_max_bytes(4)
    assert parse_max_bytes("256", 2) == 256 * 1024
    for bad in ("0", "-4", "abc", "1.5", str(sar.LIMIT_MAX_BYTES // 1024 + 1)):
        with pytest.raises(ValueError, match="ENGINE_CUSTOM_ALLREDUCE_MAX_KB"):
            parse_max_bytes(bad, 2)


def test_a_call_takes_the_fast_path_only_for_small_bf16_or_fp32():
    assert is_eligible(torch.bfloat16, 8 * 1024, MIB)      # a decode token of a 4096 model
    assert is_eligible(torch.float32, MIB, MIB)            # up to the ceiling, inclusive
    assert not is_eligible(torch.bfloat16, MIB + 4, MIB)   # above it: NCCL
    assert not is_eligible(torch.float16, 8 * 1024, MIB)   # the kernels lack fp16
    assert not is_eligible(torch.int32, 8 * 1024, MIB)
    assert not is_eligible(torch.bfloat16, 0, MIB)         # empty
    assert not is_eligible(torch.bfloat16, 6, MIB)         # 3 bf16: size not 4-byte aligned
    assert is_eligible(torch.bfloat16, 12, MIB)


def test_a_group_of_one_declines_before_any_collective(tmp_path):
    """A pipeline-only group has one rank: no kernel, and no collective (its peers in other
    groups are not there to answer)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("torch.distributed already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        fast, reason = sar.SymmAllReduce.create(dist.group.WORLD, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert fast is None and "1 ranks" in reason


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (symmetric memory over NVLink/P2P)")
def test_gpu_symm_allreduce_matches_nccl_eager_and_in_graphs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import allreduce_check

    result = allreduce_check.run_check(2)
    assert result.passed, result.text
