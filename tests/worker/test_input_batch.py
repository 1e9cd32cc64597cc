"""The step's flat inputs: each array uploaded to the device starts on a 16-byte boundary
whatever the number of requests (kernel compilers specialise on pointer alignment, so an
alignment that followed the batch size made kernels compile again mid-run)."""

from __future__ import annotations

import pytest
import torch

from engine.messages.step import NewRequestData, SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.worker.input_batch import InputBatch


def _step(num_reqs: int) -> SchedulerOutput:
    reqs = [NewRequestData(req_id=f"r{i}", prompt_token_ids=list(range(3 + i)),
                           output_token_ids=[], sampling_params=SamplingParams(max_tokens=4),
                           block_ids=([i],), num_computed_tokens=0) for i in range(num_reqs)]
    return SchedulerOutput(reqs, [], {r.req_id: len(r.prompt_token_ids) for r in reqs},
                           sum(len(r.prompt_token_ids) for r in reqs))


@pytest.mark.parametrize("num_reqs", [1, 2, 3, 5, 6, 7])
def test_uploaded_views_are_16_byte_aligned_and_hold_the_inputs(num_reqs):
    batch = InputBatch(block_size=16, device=torch.device("cpu"))
    out = _step(num_reqs)
    batch.update(out)
    inputs = batch.prepare(out)
    attn = inputs.attn
    int64_views = [inputs.input_ids, inputs.positions, attn.slot_mapping,
                   inputs.sample_token_idx]
    int32_views = [attn.query_start_loc, attn.seq_lens, attn.block_table]
    for views in (int64_views, int32_views):
        base = views[0].data_ptr()
        offsets = [v.data_ptr() - base for v in views]
        assert all(o % 16 == 0 for o in offsets), offsets
    lens = [3 + i for i in range(num_reqs)]
    assert inputs.input_ids.tolist() == [t for n in lens for t in range(n)]
    assert attn.seq_lens.tolist() == lens
    assert attn.query_start_loc.tolist() == [sum(lens[:i]) for i in range(num_reqs + 1)]
    assert attn.block_table.flatten().tolist() == list(range(num_reqs))
    assert inputs.sample_token_idx.tolist() == [sum(lens[: i + 1]) - 1 for i in range(num_reqs)]
