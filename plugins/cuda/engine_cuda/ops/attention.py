"""Paged attention in Triton: one launch for a mixed batch of prefill chunks and decodes.

Rule: request i's queries are rows `query_start_loc[i]:query_start_loc[i+1]` of q and sit at
positions `seq_lens[i] - q_len .. seq_lens[i] - 1`; each attends causally over its paged
context. Rows after the last request's end (CUDA-graph padding) are never read or written,
and a request with seq_len 0 writes zeros.

Tiles (bf16, head size 128, GQA group 4; checked on sm_90 for register spills by
tests/test_ops_compile.py): prefill 128 rows (32 tokens x 4 heads) x 64 keys, 8 warps, 2
stages; decode 16 rows x 64 keys, 4 warps, 3 stages (head size 256: 64 rows, 32 keys).
`paged_attention(decode_tile=..., prefill_tile=...)` overrides them; bench_ops --sweep times
alternatives on the GPU.

Kernel design. A program owns one tile of BLOCK_Q query tokens of one request times the
GROUP query heads that share one KV head, packed into the M dimension (BLOCK_M = BLOCK_Q *
GROUP_PAD rows), so each K/V tile is loaded once per KV head and feeds a `tl.dot`. It walks
the request's keys BLOCK_N at a time (a tile spans several cache blocks, looked up through
the block table), with an online softmax in float32 (exp2, scale folded in). Key tiles wholly
below the tile's first query position skip the causal mask; only the diagonal tiles mask.

Two shapes of launch:
* mixed/prefill (`max_query_len` > the small tile): grid (num_tokens // BLOCK_Q + num_reqs,
  num_kv_heads). That bounds the tiles any split of the tokens into requests can need; each
  program binary-searches `query_start_loc` for its request and exits if it has none. A
  request whose query fits the small tile (a decode) takes the small-tile code path inside
  the same kernel, so decodes mixed with prefills do not pay for 128-row dots.
* small queries (decode, `max_query_len` <= BLOCK_Q of the small tile): grid (num_reqs,
  num_kv_heads, num_splits), one program per request. With num_splits > 1 ("flash
  decoding") each program takes one slice of the context and writes an unnormalised partial
  (acc, max, sum) to scratch; a second kernel merges the slices. `choose_num_splits` picks
  the count from (num_reqs x num_kv_heads vs SM count, max_seq_len).

Sliding window W (WINDOW, a constexpr: the plain kernel is unchanged): query position p sees
keys p - W + 1 .. p. A tile's key walk starts at the BLOCK_N-aligned tile holding the first
key its first query sees (so split-K slices cover only the window), and every load there is
masked below that key: the block-table entries of blocks before it may be stale (freed,
reused by other requests, NaN for all we know) and are never followed. Keys inside every
row's window and below every row's position take the unmasked path, as without a window.
Logits soft-cap c (SOFT_CAP, a constexpr): scores become c * tanh(s / c) before the softmax,
tanh spelled through exp2 (Triton has no tanh in every version).

CUDA-graph replay: grid sizes depend only on q.shape[0], seq_lens.numel(), num_kv_heads and
the python ints `max_query_len` / `max_seq_len` / `num_splits`. For a captured graph keep
q.shape[0], the request count (pad it: padded requests get q_len 1 and seq_len 0),
`max_query_len` and the split count constant across replays; pass `num_splits` explicitly
(or a fixed `max_seq_len`, e.g. the model's maximum) so the heuristic cannot change it.
The tensors themselves must be the captured (static) buffers, with block_table's row stride
fixed; their contents (query_start_loc, seq_lens, block_table, slots) may change freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# The H100's SM count; the split heuristic takes it as a parameter so it is testable on CPU.
H100_NUM_SMS = 132
# Fewer context tokens than this per slice is not worth a split (the merge costs a launch).
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 32
# tl.dot needs at least 16 rows; the small-query tile is exactly that.
MIN_BLOCK_M = 16
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: no NaNs


@dataclass(frozen=True)
class TileConfig:
    block_q: int  # query tokens per program
    block_m: int  # rows = block_q * group_pad
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def small_query_config(group: int, head_size: int) -> TileConfig:
    """Decode tile: 16 rows (a few tokens x the KV head's query heads), keys 64 at a time."""
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, MIN_BLOCK_M // group_pad)
    block_n = 64 if head_size <= 128 else 32
    return TileConfig(block_q, block_q * group_pad, block_n, num_warps=4, num_stages=3)


def prefill_config(group: int, head_size: int) -> TileConfig:
    """Prefill tile: 128 rows for head_size <= 128 (64 beyond), keys 64 (32) at a time."""
    group_pad = triton.next_power_of_2(group)
    rows = 128 if head_size <= 128 else 64
    block_q = max(1, rows // group_pad)
    block_m = block_q * group_pad
    block_n = 64 if head_size <= 128 else 32
    # 8 warps: with 4, the 128x128 tile (or head size 256) spills registers on sm_90.
    return TileConfig(block_q, block_m, block_n, num_warps=8, num_stages=2)


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int,
                      num_sms: int = H100_NUM_SMS) -> int:
    """Context slices per (request, KV head) for the small-query launch.

    Split only when the (request, KV head) programs leave SMs idle; then aim for about one
    program per SM, but never slices shorter than MIN_TOKENS_PER_SPLIT keys.
    """
    programs = num_reqs * num_kv_heads
    if programs >= num_sms:
        return 1
    by_fill = num_sms // max(1, programs)
    by_len = max_seq_len // MIN_TOKENS_PER_SPLIT
    return max(1, min(by_fill, by_len, MAX_SPLITS))


def windowed_len(max_seq_len: int, sliding_window: Optional[int]) -> int:
    """The most keys one query reads: what the split heuristic should size slices by."""
    return max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)


@triton.jit
def _soft_cap(s, cap_in, cap_out):
    """cap_out * tanh(s * cap_in), tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends
    (exp2 overflowing to inf gives 1, underflowing to 0 gives -1), no NaN."""
    e = tl.exp2(s * (cap_in * 2.8853900817779268))  # 2 * log2(e)
    return (1.0 - 2.0 / (e + 1.0)) * cap_out


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q, k_base, v_base, bt_row, n_lo, n_hi, q_pos, kv_lo, window,
    block_size, stride_c_block, stride_c_slot, qk_scale, cap_in,
    HEAD_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    """Fold keys n_lo .. n_hi-1 (n_lo a multiple of BLOCK_N) into the online softmax.
    MASKED: apply the causal mask and n < n_hi (diagonal / tail tiles), and with WINDOW the
    window and n >= kv_lo (nothing below kv_lo is loaded); else every key is visible to
    every row, and n_hi - n_lo is a multiple of BLOCK_N. SOFT_CAP: qk_scale is cap * log2(e)
    and cap_in scale / cap."""
    offs_d = tl.arange(0, HEAD_SIZE)
    for start in range(n_lo, n_hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = n < n_hi
            if WINDOW:
                in_range = in_range & (n >= kv_lo)
            blk = tl.load(bt_row + n // block_size, mask=in_range, other=0)
        else:
            blk = tl.load(bt_row + n // block_size)
        slot = blk.to(tl.int64) * stride_c_block + (n % block_size) * stride_c_slot  # [N]
        kv_offs = slot[:, None] + offs_d[None, :]  # [N, D], head_size contiguous
        if MASKED:
            k = tl.load(k_base + kv_offs, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_base + kv_offs)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFT_CAP:
            s = _soft_cap(s, cap_in, qk_scale)  # [M, N], log2 domain
        else:
            s = s * qk_scale  # [M, N], log2 domain
        if MASKED:
            visible = (n[None, :] <= q_pos[:, None]) & in_range[None, :]
            if WINDOW:
                visible = visible & (q_pos[:, None] - n[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + kv_offs, mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_base + kv_offs)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_tile(
    q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, bt_ptr,
    req, tile, q_start, q_len, seq_len, kv_head, split, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head, stride_bt,
    stride_pa_s, stride_pa_t, stride_pa_h, stride_pm_s, stride_pm_t,
    block_size, qk_scale, window, cap_in,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    """Query tokens tile*BLOCK_Q .. of request `req`, times the KV head's query heads."""
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_tok = tile * BLOCK_Q + rows // GROUP_PAD  # token index within the request
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = context + q_tok
    offs_d = tl.arange(0, HEAD_SIZE)
    q_rows = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    # Keys this tile sees: 0 (kv_lo with a window) .. its last query position; those below
    # its first query position (and, with a window, inside its last query's window) are
    # visible to every row (no mask needed).
    kv_end = context + tl.minimum(q_len, (tile + 1) * BLOCK_Q)
    kv_all = tl.maximum(context + tile * BLOCK_Q, 0)
    if WINDOW:
        kv_lo = tl.maximum(kv_all - window + 1, 0)  # the first row's first key
        n_base = (kv_lo // BLOCK_N) * BLOCK_N
    else:
        kv_lo = 0
        n_base = 0
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(kv_end - n_base, num_splits), BLOCK_N) * BLOCK_N
        n_lo = n_base + split * per_split
        n_hi = tl.minimum(kv_end, n_lo + per_split)
    else:
        n_lo = n_base
        n_hi = kv_end
    if WINDOW:
        # Below the last row's first key (kv_end - window) some rows need the window mask.
        win_all = tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N
        free_lo = tl.minimum(tl.maximum(win_all, n_lo), tl.maximum(n_hi, n_lo))
    else:
        free_lo = n_lo
    n_full = free_lo + (tl.maximum(tl.minimum(n_hi, kv_all) - free_lo, 0) // BLOCK_N) * BLOCK_N

    acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_c_head
    v_base = k_base + stride_c_kv
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    if WINDOW:  # the window's lower edge
        acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, bt_row, n_lo, free_lo,
                                     q_pos, kv_lo, window, block_size, stride_c_block,
                                     stride_c_slot, qk_scale, cap_in, HEAD_SIZE, BLOCK_N, True,
                                     IEEE, WINDOW, SOFT_CAP)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, bt_row, free_lo, n_full,
                                 q_pos, kv_lo, window, block_size, stride_c_block,
                                 stride_c_slot, qk_scale, cap_in, HEAD_SIZE, BLOCK_N, False,
                                 IEEE, WINDOW, SOFT_CAP)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, bt_row, n_full, n_hi,
                                 q_pos, kv_lo, window, block_size, stride_c_block,
                                 stride_c_slot, qk_scale, cap_in, HEAD_SIZE, BLOCK_N, True,
                                 IEEE, WINDOW, SOFT_CAP)

    if SPLIT:
        pa = (part_acc_ptr + split * stride_pa_s + q_rows[:, None] * stride_pa_t
              + head[:, None] * stride_pa_h + offs_d[None, :])
        tl.store(pa, acc, mask=row_ok[:, None])
        pm = split * stride_pm_s + q_rows * stride_pm_t + head
        tl.store(part_m_ptr + pm, m_i, mask=row_ok)
        tl.store(part_l_ptr + pm, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no keys (seq_len 0): zeros
        o_ptr = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# Arguments that change from step to step are not specialised on (Triton would otherwise
# compile a variant for each of "== 1", "divisible by 16" and neither, and the first steps
# of a run would wait for those compiles: 4.5 s of an H100's first 1000-prompt run). The
# split count is one of them: as a constexpr every count 2..MAX_SPLITS that a step's batch
# size and context length picked was a compile of its own (an H200 serving 500 arriving
# prompts spent ~6% of its engine-core samples compiling them inside the run); only whether
# the launch splits at all (SPLIT) changes the code.
@triton.jit(do_not_specialize=["num_reqs", "num_splits", "stride_bt", "stride_pa_s",
                               "stride_pm_s", "window"])
def _paged_attention_kernel(
    q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_block, stride_c_slot, stride_c_head, stride_bt,
    stride_pa_s, stride_pa_t, stride_pa_h, stride_pm_s, stride_pm_t,
    num_reqs, num_splits, block_size, qk_scale, window, cap_in,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_TILE_PER_REQ: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    SMALL_Q: tl.constexpr, SMALL_M: tl.constexpr, SMALL_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_TILE_PER_REQ:
        req = pid
        tile = 0
    else:
        # Request r's tiles start at program qsl[r] // BLOCK_Q + r (strictly increasing in r):
        # find the last request starting at or before this program.
        lo = pid * 0
        hi = lo + num_reqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(first <= pid, mid, lo)
            hi = tl.where(first <= pid, hi, mid)
        req = lo
        tile = pid - (tl.load(qsl_ptr + req) // BLOCK_Q + req)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    if SMALL_Q > 0:
        # Mixed launch: decodes (and other short queries) take the small tile, so they do
        # not pay for BLOCK_M rows of tensor-core work each; their only tile is tile 0.
        if q_len <= SMALL_Q:
            _attend_tile(q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, bt_ptr,
                         req, 0, q_start, q_len, seq_len, kv_head, split, num_splits,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_c_kv, stride_c_block, stride_c_slot, stride_c_head, stride_bt,
                         stride_pa_s, stride_pa_t, stride_pa_h, stride_pm_s, stride_pm_t,
                         block_size, qk_scale, window, cap_in, GROUP, GROUP_PAD, HEAD_SIZE,
                         SMALL_Q, SMALL_M, SMALL_N, SPLIT, IEEE, WINDOW, SOFT_CAP)
            return
    _attend_tile(q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, bt_ptr,
                 req, tile, q_start, q_len, seq_len, kv_head, split, num_splits,
                 stride_qt, stride_qh, stride_ot, stride_oh,
                 stride_c_kv, stride_c_block, stride_c_slot, stride_c_head, stride_bt,
                 stride_pa_s, stride_pa_t, stride_pa_h, stride_pm_s, stride_pm_t,
                 block_size, qk_scale, window, cap_in, GROUP, GROUP_PAD, HEAD_SIZE,
                 BLOCK_Q, BLOCK_M, BLOCK_N, SPLIT, IEEE, WINDOW, SOFT_CAP)


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "stride_pa_s", "stride_pm_s"])
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, qsl_ptr, num_reqs, num_splits,
    stride_pa_s, stride_pa_t, stride_pa_h, stride_pm_s, stride_pm_t, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(qsl_ptr + num_reqs):  # padding rows: left alone
        return
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    pm = s * stride_pm_s + token.to(tl.int64) * stride_pm_t + head
    m = tl.load(part_m_ptr + pm, mask=s_ok, other=NEG_BIG)
    l_ = tl.load(part_l_ptr + pm, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(l_ * w, 0)
    offs_d = tl.arange(0, HEAD_SIZE)
    pa = (part_acc_ptr + s[:, None] * stride_pa_s + token.to(tl.int64) * stride_pa_t
          + head * stride_pa_h + offs_d[None, :])
    acc = tl.load(pa, mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptr = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty))


def paged_attention(
    q: torch.Tensor,  # [T, H, D]; T may exceed query_start_loc[-1] (padding rows)
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    out: torch.Tensor,  # [T, H, D]; only rows < query_start_loc[-1] are written
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_table: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    *,
    num_splits: Optional[int] = None,
    num_sms: int = H100_NUM_SMS,
    decode_tile: Optional[TileConfig] = None,
    prefill_tile: Optional[TileConfig] = None,
    sliding_window: Optional[int] = None,
    logits_soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Causal paged attention of every request's new tokens over its context; returns `out`.

    `sliding_window` W: a query at position p sees keys p - W + 1 .. p only, and no cache
    block wholly before the first key a query sees is read. `logits_soft_cap` c: scores s
    become c * tanh(s / c).

    `num_splits` None picks the flash-decoding slice count with `choose_num_splits` (it only
    applies when every request fits one small-query tile, i.e. decode batches).
    `decode_tile` / `prefill_tile` replace the default tiles (for tuning, see bench_ops).
    """
    num_tokens, num_heads, head_size = q.shape
    num_reqs = seq_lens.numel()
    _, _, block_size, num_kv_heads, cache_head_size = kv_cache.shape
    _check_shapes(q, kv_cache, out, num_heads, num_kv_heads, head_size, cache_head_size)
    if num_reqs == 0 or num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    small = decode_tile or small_query_config(group, head_size)
    one_tile = max_query_len <= small.block_q
    cfg = small if one_tile else prefill_tile or prefill_config(group, head_size)
    _check_tile(cfg, group)
    if not one_tile:
        num_splits = 1
    elif num_splits is None:
        num_splits = choose_num_splits(num_reqs, num_kv_heads,
                                       windowed_len(max_seq_len, sliding_window), num_sms)
    if num_splits > MAX_SPLITS:
        raise ValueError(f"paged_attention: num_splits {num_splits} > MAX_SPLITS {MAX_SPLITS}")
    if num_splits > 1:
        part_acc = torch.empty((num_splits, num_tokens, num_heads, head_size),
                               dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32,
                             device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # the kernel never touches them (num_splits == 1): no allocation per call
        part_acc, part_m, part_l = out, out, out
    programs = num_reqs if one_tile else num_tokens // cfg.block_q + num_reqs
    grid = (programs, num_kv_heads, num_splits)
    log2e = 1.4426950408889634  # exp2 softmax: scores in the log2 domain
    if logits_soft_cap is None:
        qk_scale, cap_in = scale * log2e, 0.0
    else:  # s -> cap * tanh(scale * q.k / cap), then into the log2 domain
        qk_scale, cap_in = logits_soft_cap * log2e, scale / logits_soft_cap
    _paged_attention_kernel[grid](
        q, kv_cache, out, part_acc, part_m, part_l,
        query_start_loc, seq_lens, block_table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_m.stride(0), part_m.stride(1),
        num_reqs, num_splits, block_size, qk_scale, sliding_window or 0, cap_in,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_SIZE=head_size,
        BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        ONE_TILE_PER_REQ=one_tile, SPLIT=num_splits > 1, IEEE=q.dtype == torch.float32,
        # Short queries of a mixed launch take the small tile (off when it is not smaller).
        SMALL_Q=0 if one_tile or small.block_q > cfg.block_q else small.block_q,
        SMALL_M=small.block_m,
        SMALL_N=small.block_n,
        WINDOW=sliding_window is not None, SOFT_CAP=logits_soft_cap is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_m, part_l, out, query_start_loc, num_reqs, num_splits,
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            part_m.stride(0), part_m.stride(1), out.stride(0), out.stride(1),
            # One variant for every count (a padded split costs a masked load).
            SPLITS_PAD=triton.next_power_of_2(MAX_SPLITS),
            HEAD_SIZE=head_size, num_warps=4,
        )
    return out


def _check_shapes(q, kv_cache, out, num_heads, num_kv_heads, head_size, cache_head_size) -> None:
    if cache_head_size != head_size or num_heads % num_kv_heads:
        raise ValueError(
            f"paged_attention: q {tuple(q.shape)} does not match the cache "
            f"{tuple(kv_cache.shape)} (head_size equal, num_heads a multiple of num_kv_heads)"
        )
    if head_size < 16 or head_size > 256 or head_size & (head_size - 1):
        raise ValueError(
            f"paged_attention: head_size {head_size} is not supported (a power of two in "
            "16..256)"
        )
    if out.shape != q.shape:
        raise ValueError(f"paged_attention: out {tuple(out.shape)} != q {tuple(q.shape)}")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("paged_attention: q, out and kv_cache need a contiguous last dimension")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"paged_attention: q is {q.dtype} but the cache is {kv_cache.dtype}")


def _check_tile(cfg: TileConfig, group: int) -> None:
    group_pad = triton.next_power_of_2(group)
    if cfg.block_m != cfg.block_q * group_pad or cfg.block_m < MIN_BLOCK_M or cfg.block_n < 16:
        raise ValueError(
            f"paged_attention: tile {cfg} does not fit GQA group {group}: block_m must be "
            f"block_q * {group_pad} and >= {MIN_BLOCK_M}, block_n >= 16"
        )
