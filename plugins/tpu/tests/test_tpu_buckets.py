"""Padded shape buckets (pure logic, runs everywhere) and the bucket runner's padding, run on
the CPU so the padding logic is checked without torch_xla."""

import pytest
import torch

from platforms.buckets import (
    BucketLimits,
    bucket_for,
    decode_buckets,
    num_programs,
    powers_of_two,
)
from platforms.static_attention import StepShape
from platforms.testing import make_platform_config

LIMITS = BucketLimits(max_num_seqs=6, max_num_batched_tokens=100, max_blocks_per_req=9)


def test_bucket_sets_cover_the_limits():
    assert powers_of_two(1, 6) == (1, 2, 4, 8)
    assert LIMITS.batch_buckets == (1, 2, 4, 8)
    assert LIMITS.query_buckets == (1, 16, 32, 64, 128)
    assert LIMITS.block_buckets == (1, 2, 4, 8, 16)
    assert num_programs(LIMITS) == 4 * 5 * 5
    assert len(decode_buckets(LIMITS)) == 4 * 5


@pytest.mark.parametrize("step, shape", [
    ((1, 1, 1), StepShape(1, 1, 1)),
    ((3, 1, 5), StepShape(4, 1, 8)),
    ((2, 17, 3), StepShape(2, 32, 4)),
    ((6, 100, 9), StepShape(8, 128, 16)),
])
def test_each_step_pads_to_the_smallest_bucket(step, shape):
    assert bucket_for(LIMITS, *step) == shape


def test_a_step_beyond_the_limits_is_an_error():
    with pytest.raises(ValueError, match="request count 9 is above the largest bucket 8"):
        bucket_for(LIMITS, 9, 1, 1)


def test_runner_pads_to_a_bucket_and_returns_only_real_rows():
    from engine_tpu.graph import XlaBucketRunner

    from platforms.interface import AttentionSpec, CommonAttentionMetadata
    from platforms.static_attention import StaticPagedAttentionBackend

    backend = StaticPagedAttentionBackend(AttentionSpec(2, 2, 4, torch.float32, 4))
    seen = []

    def forward(ids, pos, md):
        seen.append((ids.shape[0], md.shape))
        return ids[:, None].float() * 2

    config = make_platform_config(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                                  block_size=4)
    runner = XlaBucketRunner(forward, config)
    runner.lazy = False  # an eager device: the padding logic alone
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    common = CommonAttentionMetadata(
        num_reqs=2, num_actual_tokens=4, max_query_len=3, max_seq_len=6,
        query_start_loc_cpu=qsl, seq_lens_cpu=torch.tensor([3, 6], dtype=torch.int32),
        num_computed_tokens_cpu=torch.tensor([0, 5], dtype=torch.int32),
        query_start_loc=qsl, seq_lens=torch.tensor([3, 6], dtype=torch.int32),
        block_table=torch.tensor([[1, 0], [2, 3]], dtype=torch.int32),
        slot_mapping=torch.tensor([4, 5, 6, 13]))
    out = runner(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 2, 5]),
                 backend.build_metadata(common))
    assert seen == [(32, StepShape(2, 16, 2))]
    assert out[:, 0].tolist() == [10.0, 12.0, 14.0, 16.0]
