"""The CPU platform's native decode kernel and its torch fallback both pass the kit, and the
native one is really in use where it compiled."""

from __future__ import annotations

import pytest
import torch

from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.native import load_library, native_kernels_status
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec
from platforms.testing import ATTENTION_CASES, check_attention_against_reference


class TorchOnlyBackend(CpuAttentionBackend):
    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.native = None  # force the padded-SDPA path


class TorchOnlyCpuPlatform(CpuPlatform):
    name = "cpu-torch-only"

    def attention_backend(self, spec: AttentionSpec) -> CpuAttentionBackend:
        return TorchOnlyBackend(spec)


def test_native_kernel_compiles_here():
    # This machine (and CI, the same kind) has a C compiler: the fast path must be live.
    assert load_library() is not None, native_kernels_status()
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16)
    assert CpuAttentionBackend(spec).native is not None


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_torch_fallback_matches_reference(case):
    assert check_attention_against_reference(TorchOnlyCpuPlatform(), case) < 1e-4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_kernel_matches_reference_on_fresh_inputs(seed):
    for case in ATTENTION_CASES:
        assert check_attention_against_reference(CpuPlatform(), case, seed=seed) < 1e-4


@pytest.mark.parametrize("num_decodes", [1, 5, 16])  # few: a task per KV head; many: per request
@pytest.mark.parametrize("heads,kv_heads,head", [(9, 3, 64), (80, 10, 32), (4, 4, 128)])
def test_native_decode_task_split_matches_plain_attention(num_decodes, heads, kv_heads, head):
    # 80 / 10: eight query rows per KV head, so a task of all KV heads is split in a run of 8
    # and a run of 2; seq lengths not multiples of the block size.
    lib = load_library()
    assert lib is not None, native_kernels_status()
    gen = torch.Generator().manual_seed(num_decodes * heads)
    block, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks, block, kv_heads, head, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, head, generator=gen)
    seq_lens = torch.randint(1, 6 * block, (num_decodes,), generator=gen, dtype=torch.int32)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:6]
                          for _ in range(num_decodes)]).to(torch.int32)
    q = torch.randn(num_decodes, heads, head, generator=gen)
    out = torch.empty_like(q)
    scale = head**-0.5
    assert lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                tables.data_ptr(), tables.stride(0), seq_lens.data_ptr(),
                                out.data_ptr(), num_decodes, heads, kv_heads, head, block, scale,
                                0, 0.0, torch.get_num_threads()) == 0
    for d in range(num_decodes):
        n = int(seq_lens[d])
        k = k_cache[tables[d].long()].flatten(0, 1)[:n]  # [n, kv_heads, head]
        v = v_cache[tables[d].long()].flatten(0, 1)[:n]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[d], k) * scale, dim=-1)
        torch.testing.assert_close(out[d], torch.einsum("hn,nhd->hd", p, v),
                                   rtol=1e-4, atol=1e-5)
