"""The Triton attention backend passes the platform conformance kit, and handles the padded
batches a CUDA-graph runner feeds it (CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine_cuda.attention import TritonAttentionBackend  # noqa: E402

from platforms.interface import (  # noqa: E402
    ATTENTION_FEATURES,
    AttentionSpec,
    Capabilities,
    CommonAttentionMetadata,
    Platform,
)
from platforms.testing.attention import (  # noqa: E402
    ATTENTION_CASES,
    FEATURE_CASES,
    check_attention_against_reference,
    check_attention_features,
    supported_feature_cases,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TritonTestPlatform(Platform):
    """The current device, with the Triton backend: what the kit drives."""

    name = "triton-test"
    device_type = DEVICE
    capabilities = Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16),
                                attention_features=frozenset(ATTENTION_FEATURES))

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> tuple[int, int]:
        return (1 << 30, 1 << 30)

    def attention_backend(self, spec: AttentionSpec) -> TritonAttentionBackend:
        return TritonAttentionBackend(spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_conformance_kit(case, dtype):
    check_attention_against_reference(TritonTestPlatform(), case, dtype=dtype)


def test_conformance_kit_with_split_decode_and_large_blocks():
    # A tiny SM count forces split-K for the kit's decodes; 32-token blocks change the paging.
    class SplitPlatform(TritonTestPlatform):
        def attention_backend(self, spec):
            return TritonAttentionBackend(spec, num_sms=64)

    requests = ((300, 1), (129, 1), (0, 1))
    check_attention_against_reference(SplitPlatform(), ATTENTION_CASES[2], block_size=32,
                                      requests=requests)


@pytest.mark.parametrize("feature_case", FEATURE_CASES, ids=lambda c: c.id)
def test_conformance_kit_window_and_soft_cap(feature_case):
    # Stale blocks before each step's window hold NaN; decode steps run past the window.
    assert supported_feature_cases(TritonTestPlatform()) == FEATURE_CASES
    for case in (ATTENTION_CASES[0], ATTENTION_CASES[5]):
        check_attention_features(TritonTestPlatform(), case, feature_case)


def test_conformance_kit_window_split_decode_bfloat16():
    class SplitPlatform(TritonTestPlatform):
        def attention_backend(self, spec):
            return TritonAttentionBackend(spec, num_sms=64)

    check_attention_features(SplitPlatform(), ATTENTION_CASES[2], FEATURE_CASES[2],
                             dtype=torch.bfloat16)


def _metadata(q_lens, seq_lens, table, slots) -> CommonAttentionMetadata:
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens_t, 0)
    return CommonAttentionMetadata(
        num_reqs=len(q_lens), num_actual_tokens=int(q_lens_t.sum()),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens_t,
        num_computed_tokens_cpu=seq_lens_t - q_lens_t,
        query_start_loc=qsl.to(DEVICE), seq_lens=seq_lens_t.to(DEVICE),
        block_table=table.to(DEVICE), slot_mapping=slots.to(DEVICE),
    )


def test_forward_with_padded_rows_writes_and_attends_only_real_tokens():
    spec = AttentionSpec(4, 2, 32, torch.float32, 4)
    backend = TritonAttentionBackend(spec)
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(backend.kv_cache_shape(4)).to(DEVICE)
    # Two fresh prompts of 3 and 2 tokens, then 3 padding rows (a graph size of 8).
    q, k, v = (torch.randn(8, h, 32, generator=gen).to(DEVICE) for h in (4, 2, 2))
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    slots = torch.tensor([8, 9, 10, 4, 5], dtype=torch.int64)
    metadata = backend.build_metadata(_metadata([3, 2], [3, 2], table, slots))
    out = backend.forward(q, k, v, cache, metadata, 32**-0.5)

    assert out.shape == q.shape
    assert torch.equal(out[5:], torch.zeros_like(out[5:]))
    written = cache.view(2, 16, 2, 32)
    assert torch.equal(written[0, [8, 9, 10, 4, 5]], k[:5])
    assert torch.equal(written[1, [8, 9, 10, 4, 5]], v[:5])
    untouched = [s for s in range(16) if s not in (8, 9, 10, 4, 5)]
    assert torch.equal(written[:, untouched], torch.zeros_like(written[:, untouched]))
    # Token 0 of each prompt sees only itself: its output is its own value, per query head.
    assert torch.allclose(out[0], v[0].repeat_interleave(2, 0), atol=1e-6)
    assert torch.allclose(out[3], v[3].repeat_interleave(2, 0), atol=1e-6)
