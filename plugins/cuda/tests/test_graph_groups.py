"""CudaGraphRunner with several KV-cache groups (a GroupedAttentionMetadata): per-group static
block tables and slots on CPU, each recorded attention call reads its own group's entry, the
group of each call is learned from the capture; on a GPU, replays of a model with a windowed,
soft-capped group and a plain one equal eager, with NaN in the windowed group's stale blocks.

Rule: the CPU tests drive the real buffers (and the Triton backends in the interpreter); only
capture and replay need a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_cuda.graph import (
    RecordedAttention,
    StaticDecodeInputs,
    first_entry,
    group_entries,
    group_of_call,
)
from engine_cuda.platform import CudaPlatform

from platforms.config import PlatformConfig
from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    CommonAttentionMetadata,
    GroupedAttentionMetadata,
)
from platforms.testing import make_platform_config
from platforms.util import cdiv

HAS_CUDA = CudaPlatform.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda)")


def _entry(seq_lens, table, slots):
    return SimpleNamespace(seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                           block_table=torch.tensor(table, dtype=torch.int32),
                           slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=1)


def test_fill_keeps_a_table_and_slots_per_group_and_shares_seq_lens():
    static = StaticDecodeInputs(max_batch=4, max_tokens=4, max_blocks=3,
                                device=torch.device("cpu"), num_groups=3)
    grouped = GroupedAttentionMetadata((
        _entry([17, 3], [[7, 2], [5, 0]], [34, 82]),
        None,  # a group with no layer here (another pipeline stage's)
        _entry([17, 3], [[1], [4]], [17, 66]),
    ))
    assert first_entry(grouped) is grouped[0]
    assert [g for g, _ in group_entries(grouped)] == [0, 2]
    static.fill(4, torch.tensor([11, 12]), torch.tensor([16, 2]), grouped)
    assert static.seq_lens.tolist() == [17, 3, 0, 0]
    assert static.block_tables[0][:2, :2].tolist() == [[7, 2], [5, 0]]
    assert static.block_tables[2][:2, :1].tolist() == [[1], [4]]
    assert static.slot_mappings[0].tolist() == [34, 82, -1, -1]
    assert static.slot_mappings[2].tolist() == [17, 66, -1, -1]
    assert static.slot_mappings[1].tolist() == [-1] * 4  # untouched
    common = static.common_metadata(4, max_model_len=64, group=2)
    assert common.block_table.data_ptr() == static.block_tables[2].data_ptr()
    assert common.slot_mapping.tolist() == [17, 66, -1, -1]
    assert common.seq_lens.data_ptr() == static.seq_lens.data_ptr()  # shared
    assert static.block_table is static.block_tables[0]  # one group: as before


def test_group_of_a_call_is_the_entry_it_was_handed():
    a, b = object(), object()
    grouped = GroupedAttentionMetadata((a, None, b))
    assert group_of_call(grouped, b) == 2 and group_of_call(grouped, a) == 0
    assert group_of_call(None, a) is None
    with pytest.raises(RuntimeError, match="cannot tell its KV-cache group"):
        group_of_call(grouped, object())


def test_recorded_attention_runs_with_its_groups_entry():
    seen = []

    class FakeBackend:
        def run(self, q, k, v, cache, metadata, scale):
            seen.append(metadata)
            return q

    rows = torch.zeros(4, 2, 8)
    record = RecordedAttention(FakeBackend(), rows, rows, rows, torch.empty_like(rows),
                               rows, 1.0, group=1)
    record.run(3, GroupedAttentionMetadata(("g0", "g1")))
    plain = RecordedAttention(FakeBackend(), rows, rows, rows, torch.empty_like(rows),
                              rows, 1.0)
    plain.run(3, "bare")
    assert seen == ["g1", "bare"]


# ---- a two-group model (even layers windowed + soft-capped, odd layers plain) ----
WINDOW, SOFT_CAP = 32, 20.0


class TwoGroupDecoder(torch.nn.Module):
    """Layer i attends through backends[i % 2] with metadata entry i % 2 (what the engine's
    Attention layer does with its kv_group); each group has its own blocks."""

    def __init__(self, backends, config: PlatformConfig, num_blocks: int, device,
                 gen: torch.Generator) -> None:
        super().__init__()
        s = config.model
        self.shape, self.backends, self.scale = s, backends, s.head_dim ** -0.5
        h, d, dtype = s.hidden_size, s.head_dim, config.dtype

        def weight(*size):
            w = torch.randn(*size, generator=gen) / size[-1] ** 0.5
            return w.to(device=device, dtype=dtype)

        self.embed = weight(s.vocab_size, h)
        self.weights = [(weight((s.num_heads + 2 * s.num_kv_heads) * d, h),
                         weight(h, s.num_heads * d)) for _ in range(s.num_layers)]
        self.caches = []
        for i in range(s.num_layers):
            shape = backends[i % 2].kv_cache_shape(num_blocks)
            self.caches.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))

    def forward(self, input_ids, positions, metadata):
        s = self.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        x = torch.nn.functional.embedding(input_ids, self.embed)
        x = x + (positions.to(x.dtype) * 1e-2)[:, None]
        for i, ((qkv, out), cache) in enumerate(zip(self.weights, self.caches)):
            g = i % 2
            entry = metadata[g] if isinstance(metadata, GroupedAttentionMetadata) else metadata
            h = torch.nn.functional.rms_norm(x, (s.hidden_size,))
            q, k, v = (h @ qkv.T).split([q_size, kv_size, kv_size], dim=-1)
            attn = self.backends[g].forward(
                q.reshape(-1, s.num_heads, s.head_dim), k.reshape(-1, s.num_kv_heads, s.head_dim),
                v.reshape(-1, s.num_kv_heads, s.head_dim), cache, entry, self.scale)
            x = x + attn.reshape(-1, q_size) @ out.T
        return x


def _backends(platform, config: PlatformConfig) -> list[AttentionBackend]:
    s = config.model
    windowed = AttentionSpec(s.num_heads, s.num_kv_heads, s.head_dim, config.dtype,
                             config.block_size, sliding_window=WINDOW, logits_soft_cap=SOFT_CAP)
    plain = AttentionSpec(s.num_heads, s.num_kv_heads, s.head_dim, config.dtype,
                          config.block_size)
    return [platform.attention_backend(windowed), platform.attention_backend(plain)]


def _common(batch, table, block_size, device) -> CommonAttentionMetadata:
    seq_lens = [c + n for c, n in batch]
    counts = [n for _, n in batch]
    slots = [int(table[i, p // block_size]) * block_size + p % block_size
             for i, (c, n) in enumerate(batch) for p in range(c, c + n)]
    qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        num_reqs=len(batch), num_actual_tokens=int(qsl[-1]), max_query_len=max(counts),
        max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq,
        num_computed_tokens_cpu=torch.tensor([c for c, _ in batch], dtype=torch.int32),
        query_start_loc=qsl.to(device), seq_lens=seq.to(device), block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device))


def grouped_batch(backends, model, batch, block_size, num_blocks, device, gen):
    """Inputs and a GroupedAttentionMetadata for `batch` [(computed, new)]: each group on its
    own shuffled blocks; the windowed group's blocks before each request's window hold NaN
    in every layer of that group (freed and reused, as the engine may have). Every other
    block is refilled first: a block a previous batch filled with NaN may be in this
    batch's windows."""
    for cache in model.caches:
        fresh = torch.randn(cache.shape, generator=gen).to(device=cache.device, dtype=cache.dtype)
        cache.copy_(fresh)
        cache[:, 0].zero_()  # block 0: the dummy batch's scratch block
    max_blocks = max(cdiv(c + n, block_size) for c, n in batch)
    metas = []
    for g, backend in enumerate(backends):
        perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays scratch
        table = torch.zeros(len(batch), max_blocks, dtype=torch.int32)
        pos = 0
        for i, (c, n) in enumerate(batch):
            count = cdiv(c + n, block_size)
            table[i, :count] = perm[pos:pos + count].to(torch.int32)
            pos += count
            if g == 0:
                stale = table[i, :max(0, c - WINDOW + 1) // block_size].long()
                for cache in model.caches[0::2]:
                    cache[:, stale.to(device)] = float("nan")
        metas.append(backend.build_metadata(_common(batch, table, block_size, device)))
    positions = torch.tensor([p for c, n in batch for p in range(c, c + n)], dtype=torch.int64)
    ids = torch.randint(0, model.shape.vocab_size, (len(positions),), generator=gen)
    return ids.to(device), positions.to(device), GroupedAttentionMetadata(metas)


def make_grouped_dummy(backends, block_size, device):
    def make_batch(n):
        qsl = torch.arange(n + 1, dtype=torch.int32)
        ones = torch.ones(n, dtype=torch.int32)
        common = CommonAttentionMetadata(
            num_reqs=n, num_actual_tokens=n, max_query_len=1, max_seq_len=1,
            query_start_loc_cpu=qsl, seq_lens_cpu=ones,
            num_computed_tokens_cpu=torch.zeros(n, dtype=torch.int32),
            query_start_loc=qsl.to(device), seq_lens=ones.to(device),
            block_table=torch.zeros(n, 1, dtype=torch.int32, device=device),
            slot_mapping=(torch.arange(n, dtype=torch.int64) % block_size).to(device))
        zeros = torch.zeros(n, dtype=torch.int64, device=device)
        return zeros, zeros.clone(), GroupedAttentionMetadata(
            b.build_metadata(common) for b in backends)
    return make_batch


def test_groups_are_learned_from_the_calls_not_the_order_of_attention():
    """The runner is handed the backends in any order; one eager forward of the grouped
    dummy batch tells it which backend serves which group (Triton in the interpreter)."""
    pytest.importorskip("triton")
    from engine_cuda.attention import TritonAttentionBackend

    from platforms.cpu.platform import CpuPlatform

    class TritonHere(CpuPlatform):  # Triton backends, tensors on this machine's device
        def attention_backend(self, spec):
            return TritonAttentionBackend(spec)

    config = make_platform_config(max_num_seqs=4, max_num_batched_tokens=32)
    backends = _backends(TritonHere(), config)
    # The interpreter on a CPU tensor here; the compiled kernel on the card's own tensors.
    device = "cuda" if HAS_CUDA else "cpu"
    model = TwoGroupDecoder(backends, config, 8, device, torch.Generator().manual_seed(0))
    graphs = CudaPlatform().graph_runner(model.forward, config, backends[::-1])
    ids, positions, dummy = make_grouped_dummy(backends, 16, device)(2)
    for backend in backends:
        backend.capture_hook = graphs._on_attention
    try:
        with torch.inference_mode():
            assert graphs._learn_groups(ids, positions, dummy)
    finally:
        for backend in backends:
            backend.capture_hook = None
    assert graphs._group_backends == {0: backends[0], 1: backends[1]}


@pytest.mark.skipif(HAS_CUDA, reason="Triton on CPU tensors: the interpreter, off the card")
def test_a_group_outside_the_platforms_backends_leaves_the_runner_eager(caplog):
    pytest.importorskip("triton")
    from engine_cuda.attention import TritonAttentionBackend

    from platforms.cpu.platform import CpuPlatform

    config = make_platform_config(max_num_seqs=4, max_num_batched_tokens=32)
    cpu_backends = _backends(CpuPlatform(), config)
    triton = TritonAttentionBackend(cpu_backends[0].spec)
    backends = [triton, cpu_backends[1]]  # group 1 does not go through Triton
    model = TwoGroupDecoder(backends, config, 8, "cpu", torch.Generator().manual_seed(0))
    graphs = CudaPlatform().graph_runner(model.forward, config, backends)
    ids, positions, dummy = make_grouped_dummy(backends, 16, "cpu")(2)
    triton.capture_hook = graphs._on_attention
    try:
        with torch.inference_mode():
            assert not graphs._learn_groups(ids, positions, dummy)
    finally:
        triton.capture_hook = None
    assert "KV-cache groups [1]" in caplog.text


# ---- on a GPU ----
GROUPED_BATCHES = (
    ((7, 1),),
    ((3, 1), (100, 1), (40, 1)),  # decodes past the window: stale blocks hold NaN
    tuple((i * 23 + 1, 1) for i in range(9)),
    ((0, 6), (70, 1), (45, 20)),  # mixed: chunk over context past the window
    ((0, 80), (150, 1)),  # a prompt longer than the window
    ((0, 250), (0, 250), (3, 100)),  # above the piecewise limit: eager
)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_gpu_grouped_graph_replay_equals_eager(dtype):
    platform = CudaPlatform()
    device = platform.device()
    config = make_platform_config(platform, dtype=dtype, max_num_seqs=16,
                                  max_num_batched_tokens=512)
    num_blocks = 128
    backends = _backends(platform, config)
    gen = torch.Generator().manual_seed(0)
    model = TwoGroupDecoder(backends, config, num_blocks, device, gen)
    for cache in model.caches:
        cache[:, 0].zero_()  # block 0: the dummy batch's scratch block
    graphs = platform.graph_runner(model.forward, config, backends)
    with torch.inference_mode():
        graphs.capture(make_grouped_dummy(backends, config.block_size, device))
    torch.cuda.synchronize()
    assert graphs.captured_sizes and graphs.piecewise_sizes
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for batch in GROUPED_BATCHES:
        ids, positions, grouped = grouped_batch(backends, model, batch, config.block_size,
                                                num_blocks, device, gen)
        with torch.inference_mode():
            want = graphs.forward(ids, positions, grouped)
            got = graphs(ids, positions, grouped)
        torch.cuda.synchronize()
        assert got.shape == want.shape
        assert torch.isfinite(want).all(), f"batch {batch}: eager read a stale block"
        err = float((got.float() - want.float()).abs().max())
        assert err <= tol, f"batch {batch}: graphs differ from eager by {err:.3g}"


def test_cuda_lists_every_attention_feature():  # ROCm inherits its capabilities
    from platforms.interface import ATTENTION_FEATURES

    assert CudaPlatform.capabilities.attention_features == frozenset(ATTENTION_FEATURES)
