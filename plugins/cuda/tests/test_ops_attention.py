"""Triton paged attention and KV-cache writes against float64 references (CPU: interpreter).

Covers what the conformance kit does not: split-K decode, padding rows, seq_len-0 requests,
several query tiles per request, odd GQA groups, cache blocks larger/smaller than a key tile.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from engine_cuda.ops.attention import (  # noqa: E402
    TileConfig,
    choose_num_splits,
    paged_attention,
    prefill_config,
    small_query_config,
)
from engine_cuda.ops.kv_cache import write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _batch(requests, num_heads, num_kv_heads, head_size, block_size, dtype, *, pad_rows=0,
           seed=0):
    """Random paged cache and queries for [(context_len, q_len)]; blocks shuffled."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in requests]
    blocks = [max(1, math.ceil(s / block_size)) for s in seq_lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(requests), max(blocks) + 2, dtype=torch.int32)
    pos = 0
    for i, b in enumerate(blocks):
        table[i, :b] = perm[pos:pos + b]
        pos += b
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=gen,
                        dtype=torch.float64)
    num_tokens = sum(n for _, n in requests)
    q = torch.randn(num_tokens + pad_rows, num_heads, head_size, generator=gen,
                    dtype=torch.float64)
    qsl = torch.zeros(len(requests) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor([n for _, n in requests]), 0)
    return dict(q=q, cache=cache, table=table, qsl=qsl,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32))


def _reference(b, scale, window=None, soft_cap=None):
    """float64 causal attention per request, through the block table (a query at p sees
    keys > p - window; scores s -> soft_cap * tanh(s / soft_cap))."""
    q, table = b["q"], b["table"]
    cache = b["cache"].nan_to_num(0.0)  # poisoned blocks lie outside every window
    block_size = cache.shape[2]
    group = q.shape[1] // cache.shape[3]
    out = torch.zeros_like(q)
    qsl, seq_lens = b["qsl"].tolist(), b["seq_lens"].tolist()
    for i, seq_len in enumerate(seq_lens):
        start, end = qsl[i], qsl[i + 1]
        if seq_len == 0:
            continue
        pos = torch.arange(seq_len)
        slots = table[i, pos // block_size].long(), pos % block_size
        k = cache[0][slots].repeat_interleave(group, 1)  # [S, H, D]
        v = cache[1][slots].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,shd->hqs", q[start:end], k) * scale
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        q_pos = torch.arange(seq_len - (end - start), seq_len)[:, None]
        blocked = pos[None, :] > q_pos
        if window is not None:
            blocked |= q_pos - pos[None, :] >= window
        scores = scores.masked_fill(blocked, float("-inf"))
        out[start:end] = torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)
    return out


def _run(b, dtype, *, max_query_len=None, num_splits=None, num_sms=132, sentinel=7.0,
         **tiles):
    q = b["q"].to(DEVICE, dtype)
    cache = b["cache"].to(DEVICE, dtype)
    out = torch.full_like(q, sentinel)
    q_lens = (b["qsl"][1:] - b["qsl"][:-1]).tolist()
    paged_attention(
        q, cache, out, b["qsl"].to(DEVICE), b["seq_lens"].to(DEVICE), b["table"].to(DEVICE),
        q.shape[-1] ** -0.5, max_query_len or max(q_lens), int(b["seq_lens"].max()),
        num_splits=num_splits, num_sms=num_sms, **tiles,
    )
    return out.cpu().double()


def _assert_close(got, b, dtype, window=None, soft_cap=None):
    expected = _reference(b, b["q"].shape[-1] ** -0.5, window, soft_cap)
    end = int(b["qsl"][-1])
    err = float((got[:end] - expected[:end]).abs().max())
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("num_splits", [1, 3, 5])
def test_split_decode_matches_reference(num_splits):
    # Contexts of several key tiles, one shorter than the split count's slices.
    b = _batch([(300, 1), (130, 1), (7, 1)], 8, 2, 64, 16, torch.float32)
    _assert_close(_run(b, torch.float32, num_splits=num_splits), b, torch.float32)


def test_split_heuristic_fills_the_sms_only_when_needed():
    assert choose_num_splits(1, 8, 4096, num_sms=132) == 16  # batch 1, 4k: one wave
    assert choose_num_splits(1, 8, 1024, num_sms=132) == 8  # capped by slice length
    assert choose_num_splits(64, 8, 4096, num_sms=132) == 1  # enough programs already
    assert choose_num_splits(2, 8, 100, num_sms=132) == 1  # context too short to split
    assert choose_num_splits(1, 1, 1 << 20, num_sms=132) == 32  # capped


def test_heuristic_split_runs_on_a_small_gpu():
    # num_sms 16 with 1 request x 2 KV heads -> 8 programs wanted, capped by 520 // 128 = 4.
    b = _batch([(520, 1)], 4, 2, 32, 16, torch.float32, seed=3)
    assert choose_num_splits(1, 2, 521, num_sms=16) == 4
    _assert_close(_run(b, torch.float32, num_sms=16), b, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_rows_untouched_and_seq_len_zero_writes_zeros(num_splits):
    # A captured decode batch: two real requests, one padded request (q_len 1, seq_len 0),
    # and 3 padding rows after the last request that hold NaN and must stay as they were.
    b = _batch([(40, 1), (0, 1), (200, 1)], 4, 1, 64, 16, torch.float32, pad_rows=3)
    b["seq_lens"][1] = 0
    b["q"][3:] = float("nan")
    got = _run(b, torch.float32, num_splits=num_splits)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[3:], torch.full_like(got[3:], 7.0))
    _assert_close(got, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batch_many_tiles_and_requests(dtype):
    # G=4 -> prefill tiles of 32 query tokens: the 70-token chunk spans 3 tiles; 9 requests
    # exercise the tile -> request search; rows of padding follow.
    requests = [(0, 70), (33, 1), (5, 40), (0, 1), (64, 32), (90, 1), (0, 3), (17, 33), (2, 1)]
    b = _batch(requests, 8, 2, 64, 16, dtype, pad_rows=5, seed=1)
    got = _run(b, dtype)
    assert torch.equal(got[-5:], torch.full_like(got[-5:], 7.0))
    _assert_close(got, b, dtype)


@pytest.mark.parametrize(("heads", "kv_heads", "head_size", "block_size"), [
    (6, 2, 32, 128),  # group of 3 (padded to 4), cache blocks larger than a key tile
    (4, 4, 256, 8),  # head size 256, small blocks
    (2, 1, 16, 16),  # smallest head size
])
def test_shapes(heads, kv_heads, head_size, block_size):
    b = _batch([(150, 20), (37, 1), (0, 9)], heads, kv_heads, head_size, block_size,
               torch.float32, seed=2)
    _assert_close(_run(b, torch.float32), b, torch.float32)


def test_small_query_batches_use_one_tile_per_request():
    # Speculative-style q_len 4 with group 4 fits the 16-row decode tile, and may split.
    assert small_query_config(4, 128).block_q == 4
    assert prefill_config(4, 128).block_m == 128
    b = _batch([(300, 4), (50, 2)], 8, 2, 64, 16, torch.float32, seed=4)
    _assert_close(_run(b, torch.float32, num_splits=2), b, torch.float32)


def test_tile_overrides_for_tuning():
    # Smaller tiles than the defaults: 16-key steps over 16-token blocks, 4-token prefill tiles.
    decodes = _batch([(45, 1), (20, 1)], 8, 2, 32, 16, torch.float32, seed=6)
    tile = TileConfig(block_q=4, block_m=16, block_n=16, num_warps=4, num_stages=2)
    _assert_close(_run(decodes, torch.float32, num_splits=2, decode_tile=tile), decodes,
                  torch.float32)
    mixed = _batch([(45, 5), (20, 1), (0, 17)], 8, 2, 32, 16, torch.float32, seed=6)
    _assert_close(_run(mixed, torch.float32, prefill_tile=tile), mixed, torch.float32)
    with pytest.raises(ValueError, match="does not fit GQA group 4"):
        _run(mixed, torch.float32, prefill_tile=TileConfig(4, 32, 16, 4, 2))


def test_rejects_unsupported_head_size():
    b = _batch([(3, 1)], 2, 1, 48, 16, torch.float32)
    with pytest.raises(ValueError, match="head_size 48"):
        _run(b, torch.float32)


def test_write_kv_scatters_and_skips_negative_slots():
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 6, 4, 3, 32, generator=gen).to(DEVICE)
    before = cache.clone()
    # key/value as strided views of a fused qkv projection, with 2 rows of padding.
    qkv = torch.randn(7, 3 * 3 * 32, generator=gen).to(DEVICE)
    key = qkv[:, 96:192].view(7, 3, 32)
    value = qkv[:, 192:].view(7, 3, 32)
    slots = torch.tensor([5, 0, -1, 23, 9], dtype=torch.int64, device=DEVICE)
    write_kv(key, value, cache, slots)
    expected = before.view(2, 24, 3, 32).clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[0, slot], expected[1, slot] = key[t], value[t]
    assert torch.equal(cache.view(2, 24, 3, 32), expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="the JIT's compile cache exists only on a GPU")
def test_split_counts_share_one_compiled_kernel():
    """Every split count 2..MAX_SPLITS runs the same compiled attention and merge kernels:
    as constexprs each count a step picked was a compile inside the run (issue 20)."""
    from engine_cuda.ops import attention as attn

    b = _batch([(600, 1), (40, 1)], 8, 2, 64, 16, torch.float32, seed=5)
    _run(b, torch.float32, num_splits=2)
    kernels = (attn._paged_attention_kernel, attn._merge_splits_kernel)
    dev = torch.cuda.current_device()
    before = [len(k.device_caches[dev][0]) for k in kernels]  # compiled variants
    for num_splits in (3, 5, 7, 16, attn.MAX_SPLITS):
        _assert_close(_run(b, torch.float32, num_splits=num_splits), b, torch.float32)
    after = [len(k.device_caches[dev][0]) for k in kernels]
    assert after == before, f"split counts compiled new variants: {before} -> {after}"


def poison_stale_blocks(b, window):
    """Fill with NaN every cache block wholly before the first key a request's first query
    sees (the engine may have freed and reused them): the kernel must not read them."""
    block_size = b["cache"].shape[2]
    q_lens = (b["qsl"][1:] - b["qsl"][:-1]).tolist()
    for i, (seq_len, q_len) in enumerate(zip(b["seq_lens"].tolist(), q_lens)):
        first_key = max(0, seq_len - q_len - window + 1)
        stale = b["table"][i, :first_key // block_size].long()
        b["cache"][:, stale] = float("nan")


# Prefill tiles that straddle the window's edge, chunks over context past it, decodes at its
# edge and far beyond, a block-aligned chunk, short requests inside it.
WINDOW_REQUESTS = [(0, 70), (40, 19), (100, 1), (23, 1), (24, 1), (5, 40), (64, 32), (0, 1),
                   (200, 3)]


@pytest.mark.parametrize(("window", "soft_cap"), [(24, None), (7, None), (100, None),
                                                  (None, 5.0), (24, 5.0), (1, None)])
def test_window_and_soft_cap_mixed_batch(window, soft_cap):
    b = _batch(WINDOW_REQUESTS, 8, 2, 64, 16, torch.float32, pad_rows=3, seed=7)
    if window is not None:
        poison_stale_blocks(b, window)
    got = _run(b, torch.float32, sliding_window=window, logits_soft_cap=soft_cap)
    assert torch.equal(got[-3:], torch.full_like(got[-3:], 7.0))
    _assert_close(got, b, torch.float32, window, soft_cap)


@pytest.mark.parametrize("num_splits", [1, 3, 6])
@pytest.mark.parametrize("window", [24, 130, 1000])
def test_window_split_decode(num_splits, window):
    # Slices cover the window only; 1000 is longer than every context (no stale block).
    b = _batch([(300, 1), (130, 1), (7, 1), (520, 2)], 8, 2, 64, 16, torch.float32, seed=8)
    poison_stale_blocks(b, window)
    got = _run(b, torch.float32, num_splits=num_splits, sliding_window=window,
               logits_soft_cap=30.0)
    _assert_close(got, b, torch.float32, window, 30.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_and_soft_cap_half_precision(dtype):
    b = _batch(WINDOW_REQUESTS, 8, 2, 64, 16, dtype, seed=9)
    poison_stale_blocks(b, 24)
    got = _run(b, dtype, sliding_window=24, logits_soft_cap=5.0)
    _assert_close(got, b, dtype, 24, 5.0)


def test_window_with_large_blocks_and_odd_group():
    # Cache blocks (128) larger than a key tile (64), group of 3, head size 32.
    b = _batch([(300, 20), (137, 1), (0, 90)], 6, 2, 32, 128, torch.float32, seed=10)
    poison_stale_blocks(b, 50)
    _assert_close(_run(b, torch.float32, sliding_window=50), b, torch.float32, 50)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy
def test_soft_cap_saturates_without_nan():
    # Huge scores: tanh through exp2 must give +-cap, not inf/inf.
    b = _batch([(40, 3), (90, 1)], 4, 2, 32, 16, torch.float32, seed=11)
    b["q"] *= 1e4
    got = _run(b, torch.float32, logits_soft_cap=2.0)
    assert torch.isfinite(got[:4]).all()
    _assert_close(got, b, torch.float32, None, 2.0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the real kernels need a GPU")
@pytest.mark.parametrize("window", [4096, 256])
def test_gpu_gemma2_shapes_window_and_soft_cap(window):
    """Gemma 2 9B's attention (16 query heads, 8 KV heads, head size 256, soft-cap 50) in
    bfloat16 on the card, contexts past the window, NaN in the blocks before each window;
    split-K and mixed launches. Prints windowed vs full decode time (pytest -s)."""
    requests = [(4600, 1), (4100, 1), (0, 300), (4200, 130), (10, 1), (window - 1, 1)]
    b = _batch(requests, 16, 8, 256, 16, torch.bfloat16, seed=12)
    poison_stale_blocks(b, window)
    for num_splits in (None, 4):
        got = _run(b, torch.bfloat16, sliding_window=window, logits_soft_cap=50.0,
                   num_splits=num_splits)
        _assert_close(got, b, torch.bfloat16, window, 50.0)
    decodes = _batch([(16000, 1)] * 4, 16, 8, 256, 16, torch.bfloat16, seed=13)
    q = decodes["q"].to(DEVICE, torch.bfloat16)
    cache = decodes["cache"].to(DEVICE, torch.bfloat16)
    args = (decodes["qsl"].to(DEVICE), decodes["seq_lens"].to(DEVICE),
            decodes["table"].to(DEVICE), 256 ** -0.5, 1, 16001)
    times = {}
    for name, extra in (("full", {}), ("windowed", dict(sliding_window=window,
                                                        logits_soft_cap=50.0))):
        out = torch.empty_like(q)
        for _ in range(3):
            paged_attention(q, cache, out, *args, **extra)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            paged_attention(q, cache, out, *args, **extra)
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 20
    print(f"4 decodes x 16k context, window {window}: full {times['full']:.3f} ms, "
          f"windowed + soft-cap {times['windowed']:.3f} ms")
    assert times["windowed"] < times["full"]
