"""Fused mixture-of-experts in Triton: router top-k, token alignment by expert, two grouped
GEMMs (gate/up with SiLU-and-mul in the epilogue, then down times the routing weight) and a
deterministic sum over each token's k slots.

Rule: the numbers of the torch references (`platforms.kernels.moe_select_experts`,
`fused_experts`, `fused_moe`), and nothing on the host: every shape and grid follows from
(T, k, E, H, I) and the tile config alone, never from where the router sent the tokens, so a
call is CUDA-graph capturable and needs no synchronisation. Routing values only decide which
programs exit early.

Data flow for T tokens, k experts each (N = T * k "slots"; slot s = token s // k, choice s % k):

1. `moe_select_experts`: one program per token scores its E logits (softmax or sigmoid in
   float32), masks all but the best `topk_group` expert groups (grouped routing), and takes
   the top k by score + correction bias k times (argmax, mask, repeat); weights are the
   scores without the bias, renormalised and scaled.
2. `align_by_expert`: slots sorted by expert into runs padded to a multiple of BLOCK_M, in a
   buffer of the fixed bound P = round_up(N + min(E, N) * (BLOCK_M - 1), BLOCK_M); padding
   and unused entries hold N (no slot). `expert_ids[b]` is block b's expert (-1: unused),
   `num_padded` the used length (a device scalar). Ids outside [0, E) (-1: another
   expert-parallel rank's expert) get no place. Counting by atomics makes the order inside
   a run arbitrary; no result depends on it (a row of a GEMM is computed alone).
3. `_gate_up_kernel`: per (M-block, N-tile) of one expert, gathers the block's token rows of
   hidden, multiplies by the gate and up rows of w13[e] and writes act(gate) * up for each
   slot (act: silu or tanh-gelu, rounded once to hidden's dtype): `inter [N, I]`.
4. `_down_kernel`: `inter` rows times w2[e]^T times the slot's float32 routing weight (the
   reference rounds the weight to hidden's dtype first; this is the closer number):
   `slot_out [N, H]` in hidden's dtype.
5. `_sum_slots_kernel`: out[t] = sum over j of slot_out[t * k + j], in order j = 0..k-1 in
   float32, skipping ids outside [0, E) (their rows were never written).

Tiles: a `MoETileConfig` per (device, E, I, H, dtype) and token-count bucket, read from
`moe_configs.json` next to this file (written on the card by `scripts/tune_moe.py`), else
`default_config`'s heuristic.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import torch
import triton
import triton.language as tl

from platforms.util import round_up

if TYPE_CHECKING:
    from platforms.kernels import MoERouting

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_configs.json")
# The activation names of `platforms.kernels.fused_experts` -> the kernel's GELU switch.
ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}
NEG_INF = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------- 1. router top-k


@triton.jit
def _select_experts_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_l, num_groups, group_size, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr, S_PAD: tl.constexpr,
    TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    # The token's experts as a [G_PAD, S_PAD] grid: expert g * group_size + s (ungrouped: G = 1).
    token = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)[:, None]
    s = tl.arange(0, S_PAD)[None, :]
    expert = g * group_size + s
    valid = (g < num_groups) & (s < group_size)
    x = tl.load(logits_ptr + token * stride_l + expert, mask=valid, other=NEG_INF).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, NEG_INF)
    if TOPK_GROUP > 0:
        best = tl.max(choice, axis=1)  # [G_PAD]
        if HAS_BIAS:  # a group scores the sum of its best two
            first = tl.min(tl.where(choice == best[:, None], s, S_PAD), axis=1)
            best += tl.max(tl.where(s == first[:, None], NEG_INF, choice), axis=1)
        group = tl.arange(0, G_PAD)
        best = tl.where(group < num_groups, best, NEG_INF)
        allowed = group < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.min(tl.where(best == tl.max(best, axis=0), group, G_PAD), axis=0)
            allowed |= group == pick
            best = tl.where(group == pick, NEG_INF, best)
        choice = tl.where(allowed[:, None], choice, NEG_INF)
    slot = tl.arange(0, K_PAD)
    top_w = tl.zeros([K_PAD], dtype=tl.float32)
    top_ids = tl.zeros([K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        pick = tl.min(tl.min(tl.where(choice == tl.max(tl.max(choice, axis=1), axis=0),
                                      expert, 1 << 30), axis=1), axis=0)
        w = tl.sum(tl.sum(tl.where(expert == pick, scores, 0.0), axis=1), axis=0)
        top_w = tl.where(slot == j, w, top_w)
        top_ids = tl.where(slot == j, pick, top_ids)
        choice = tl.where(expert == pick, NEG_INF, choice)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)
    tl.store(weights_ptr + token * TOP_K + slot, top_w * scale, mask=slot < TOP_K)
    tl.store(ids_ptr + token * TOP_K + slot, top_ids, mask=slot < TOP_K)


def moe_select_experts(router_logits: torch.Tensor, routing: MoERouting,
                       correction_bias: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int32)."""
    num_tokens, num_experts = router_logits.shape
    top_k = routing.top_k
    num_groups, topk_group = _groups(routing, num_experts)
    group_size = num_experts // num_groups
    if routing.scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"moe_select_experts: scoring {routing.scoring!r} is not softmax or "
                         "sigmoid")
    if not 0 < top_k <= topk_group * group_size:
        raise ValueError(f"moe_select_experts: top_k {top_k} must be in 1..{topk_group} "
                         f"groups x {group_size} experts")
    if correction_bias is not None and correction_bias.shape != (num_experts,):
        raise ValueError(f"moe_select_experts: correction_bias {tuple(correction_bias.shape)} "
                         f"is not [{num_experts}]")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        s_pad = triton.next_power_of_2(group_size)
        g_pad = triton.next_power_of_2(num_groups)
        bias = correction_bias if correction_bias is not None else logits
        _select_experts_kernel[(num_tokens,)](
            logits, bias, weights, ids, logits.stride(0), num_groups, group_size,
            float(routing.routed_scaling_factor), TOP_K=top_k,
            K_PAD=triton.next_power_of_2(top_k), G_PAD=g_pad, S_PAD=s_pad,
            TOPK_GROUP=topk_group if num_groups > 1 else 0,
            SIGMOID=routing.scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
            RENORMALIZE=bool(routing.renormalize), num_warps=4 if g_pad * s_pad > 512 else 1)
    return weights, ids


def _groups(routing: MoERouting, num_experts: int) -> tuple[int, int]:
    """(groups, groups kept); (1, 1) for ungrouped routing."""
    num_groups = routing.num_expert_group or 1
    if num_groups == 1:
        return 1, 1
    topk_group = routing.topk_group or num_groups
    if num_experts % num_groups or not 0 < topk_group <= num_groups:
        raise ValueError(f"moe_select_experts: {num_experts} experts do not split into "
                         f"num_expert_group={num_groups} groups with topk_group={topk_group}")
    if num_experts // num_groups < 2 and routing.topk_group and topk_group < num_groups:
        raise ValueError("moe_select_experts: grouped routing needs at least 2 experts a group")
    return num_groups, topk_group


# ---------------------------------------------------------------- 2. alignment by expert


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, num_slots, num_experts, BLOCK: tl.constexpr):
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + slot, mask=slot < num_slots, other=-1).to(tl.int32)
    ok = (slot < num_slots) & (e >= 0) & (e < num_experts)
    rank = tl.atomic_add(counts_ptr + e, 1, mask=ok)  # place of the slot in its expert's run
    tl.store(rank_ptr + slot, rank, mask=ok)


@triton.jit
def _blocks_kernel(counts_ptr, starts_ptr, expert_ids_ptr, sorted_ptr, num_padded_ptr,
                   num_experts, num_blocks, num_slots, BLOCK_M: tl.constexpr,
                   E_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    # Each program: runs' ends from the counts, then the expert of BLOCK_B M-blocks and the
    # no-slot mark over their rows (the scatter kernel after it fills the real slots).
    e = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    if tl.program_id(0) == 0:
        tl.store(starts_ptr + e, ends - padded, mask=e < num_experts)
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    block = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row = block * BLOCK_M
    owner = tl.sum((ends[None, :] <= row[:, None]).to(tl.int32), axis=1)  # runs ending before
    owner = tl.where(owner < num_experts, owner, -1)
    tl.store(expert_ids_ptr + block, owner, mask=block < num_blocks)
    rows = tl.program_id(0) * BLOCK_B * BLOCK_M + tl.arange(0, BLOCK_B * BLOCK_M)
    tl.store(sorted_ptr + rows, tl.full([BLOCK_B * BLOCK_M], num_slots, tl.int32),
             mask=rows < num_blocks * BLOCK_M)


@triton.jit
def _scatter_kernel(ids_ptr, rank_ptr, starts_ptr, sorted_ptr, num_slots, num_experts,
                    BLOCK: tl.constexpr):
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + slot, mask=slot < num_slots, other=-1).to(tl.int32)
    ok = (slot < num_slots) & (e >= 0) & (e < num_experts)
    dest = tl.load(starts_ptr + e, mask=ok, other=0) + tl.load(rank_ptr + slot, mask=ok, other=0)
    tl.store(sorted_ptr + dest, slot, mask=ok)


def padded_bound(num_slots: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted slots can need: each non-empty run pads by at most BLOCK_M - 1."""
    return round_up(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_slots [P] int32, expert_ids [P / BLOCK_M] int32,
    num_padded [1] int32); see the module docstring."""
    ids = topk_ids.reshape(-1)
    num_slots, device = ids.numel(), ids.device
    size = padded_bound(num_slots, num_experts, block_m)
    num_blocks = size // block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    rank = torch.empty(num_slots, dtype=torch.int32, device=device)
    starts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(size, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block = 256
    e_pad = triton.next_power_of_2(num_experts)
    block_b = max(1, min(triton.next_power_of_2(num_blocks), 4096 // e_pad))
    _count_kernel[(triton.cdiv(num_slots, block),)](ids, counts, rank, num_slots, num_experts,
                                                    BLOCK=block)
    _blocks_kernel[(triton.cdiv(num_blocks, block_b),)](
        counts, starts, expert_ids, sorted_slots, num_padded, num_experts, num_blocks,
        num_slots, BLOCK_M=block_m, E_PAD=e_pad, BLOCK_B=block_b)
    _scatter_kernel[(triton.cdiv(num_slots, block),)](ids, rank, starts, sorted_slots,
                                                      num_slots, num_experts, BLOCK=block)
    return sorted_slots, expert_ids, num_padded


# ---------------------------------------------------------------- 3./4. grouped GEMMs


@triton.jit
def _block_coords(num_blocks, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(M-block, N-tile) of this program, GROUP_M M-blocks walked together (L2 reuse)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = pid // per_group * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _gate_up_kernel(
    h_ptr, w_ptr, out_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_blocks, num_slots,
    top_k, inter, hidden, stride_hm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr, GELU: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_blocks, inter, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the used rows: no expert has tokens here
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + tokens[:, None] * stride_hm + ks[None, :]
    g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & (cols[None, :] < inter)
        wg = tl.load(g_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            gate = tl.dot(a, wg, gate, input_precision="ieee")
            up = tl.dot(a, wu, up, input_precision="ieee")
        else:
            gate = tl.dot(a, wg, gate)
            up = tl.dot(a, wu, up)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if GELU:  # tanh-approximate gelu as g * sigmoid(2u): no cancellation for very negative g
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * u)) * up
    else:
        act = gate / (1.0 + tl.exp(-gate)) * up
    out = out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < inter))


@triton.jit
def _down_kernel(
    x_ptr, w_ptr, out_ptr, weights_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr,
    num_blocks, num_slots, hidden, inter, stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_blocks, hidden, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = slots < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + slots[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols[None, :] < hidden), other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(weights_ptr + slots, mask=row_ok, other=0.0)[:, None]
    out = out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < hidden))


@triton.jit
def _sum_slots_kernel(slot_out_ptr, ids_ptr, out_ptr, hidden, num_experts, stride_s, stride_o,
                      TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + token * TOP_K + j)
        width = tl.where((e >= 0) & (e < num_experts), hidden, 0)  # 0: nothing to add
        row = slot_out_ptr + (token * TOP_K + j) * stride_s + cols
        acc += tl.load(row, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_o + cols, acc.to(out_ptr.dtype.element_ty),
             mask=cols < hidden)


# ---------------------------------------------------------------- tile configs


@dataclass(frozen=True)
class GemmTile:
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoETileConfig:
    """BLOCK_M (shared: the alignment pads runs to it) and each GEMM's own tile."""

    block_m: int
    gate_up: GemmTile
    down: GemmTile

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> MoETileConfig:
        return cls(data["block_m"], GemmTile(**data["gate_up"]), GemmTile(**data["down"]))


def default_config(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype
                   ) -> MoETileConfig:
    """Heuristic tiles by tokens per expert (untuned; vLLM's defaults are the model): decode
    takes 16-row blocks and wide K steps (weight-bandwidth bound), prefill 64-row blocks."""
    per_expert = num_tokens * top_k / max(1, num_experts)
    stages = 2 if dtype == torch.float32 else None  # float32 tiles fill shared memory twice
    if per_expert <= 16:
        # gate/up: 32 columns (x2: gate and up), so that one token's 8 experts at I=768 give
        # 192 programs, more than the SMs; down has H / 64 tiles per block already.
        return MoETileConfig(16, GemmTile(32, 128, 1, 4, stages or 4),
                             GemmTile(64, 128, 1, 4, stages or 4))
    if per_expert <= 64:
        tile = GemmTile(64, 64, 8, 4, stages or 4)
        return MoETileConfig(32, tile, tile)
    return MoETileConfig(64, GemmTile(128, 64, 8, 8, stages or 3),
                         GemmTile(128, 64, 8, 4, stages or 3))


def config_key(num_experts: int, inter: int, hidden: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},I={inter},H={hidden},dtype={str(dtype).removeprefix('torch.')}"


@functools.cache
def load_configs(path: str = CONFIG_PATH) -> dict:
    """{device name: {config_key: {token bucket (str): config json}}}; {} without a file."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("configs", {})


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tuned_config(configs: dict, device_name: str, key: str, num_tokens: int
                 ) -> Optional[MoETileConfig]:
    """The entry of the token bucket nearest num_tokens (the smaller on a tie), if any."""
    buckets = configs.get(device_name, {}).get(key)
    if not buckets:
        return None
    nearest = min(buckets, key=lambda b: (abs(int(b) - num_tokens), int(b)))
    return MoETileConfig.from_json(buckets[nearest])


def tile_config(num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int,
                dtype: torch.dtype, device: torch.device, path: str = CONFIG_PATH
                ) -> MoETileConfig:
    """The tuned config for this card and shape, else the default heuristic."""
    if device.type == "cuda":
        name = _device_name(device.index if device.index is not None else
                            torch.cuda.current_device())
        tuned = tuned_config(load_configs(path), name,
                             config_key(num_experts, inter, hidden, dtype), num_tokens)
        if tuned is not None:
            return tuned
    return default_config(num_tokens, num_experts, top_k, dtype)


# ---------------------------------------------------------------- the named ops


@dataclass(frozen=True)
class ExpertPlan:
    """Where each slot goes (`align_by_expert`'s outputs) for one BLOCK_M."""

    sorted_slots: torch.Tensor  # [P] int32
    expert_ids: torch.Tensor  # [P / BLOCK_M] int32
    num_padded: torch.Tensor  # [1] int32
    block_m: int
    num_slots: int
    top_k: int


def plan_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertPlan:
    return ExpertPlan(*align_by_expert(topk_ids, num_experts, block_m), block_m,
                      topk_ids.numel(), topk_ids.shape[1])


def gate_up_gemm(hidden: torch.Tensor, w13: torch.Tensor, plan: ExpertPlan, tile: GemmTile,
                 activation: str = "silu") -> torch.Tensor:
    """-> [N, I] in hidden's dtype: act(gate) * up of each slot's token through its expert."""
    inter, num_blocks = w13.shape[1] // 2, plan.expert_ids.numel()
    out = torch.empty(plan.num_slots, inter, dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(num_blocks * triton.cdiv(inter, tile.block_n),)](
        hidden, w13, out, plan.sorted_slots, plan.expert_ids, plan.num_padded, num_blocks,
        plan.num_slots, plan.top_k, inter, hidden.shape[1], hidden.stride(0), w13.stride(0),
        w13.stride(1), out.stride(0), BLOCK_M=plan.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m, IEEE=hidden.dtype == torch.float32,
        GELU=ACTIVATIONS[activation], num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


def down_gemm(inter_act: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              plan: ExpertPlan, tile: GemmTile) -> torch.Tensor:
    """inter_act [N, I], weights [N] float32 -> [N, H]: weight * w2[e] @ row, per slot."""
    hidden_size, num_blocks = w2.shape[1], plan.expert_ids.numel()
    out = torch.empty(plan.num_slots, hidden_size, dtype=inter_act.dtype,
                      device=inter_act.device)
    _down_kernel[(num_blocks * triton.cdiv(hidden_size, tile.block_n),)](
        inter_act, w2, out, weights, plan.sorted_slots, plan.expert_ids, plan.num_padded,
        num_blocks, plan.num_slots, hidden_size, inter_act.shape[1], inter_act.stride(0),
        w2.stride(0), w2.stride(1), out.stride(0), BLOCK_M=plan.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m, IEEE=inter_act.dtype == torch.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


def sum_slots(slot_out: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
              out: torch.Tensor) -> torch.Tensor:
    """out [T, H] = sum over j of slot_out[t * k + j] for ids in [0, E), in float32."""
    num_tokens, hidden_size = out.shape
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        slot_out, topk_ids, out, hidden_size, num_experts, slot_out.stride(0), out.stride(0),
        TOP_K=topk_ids.shape[1], BLOCK_H=block_h, num_warps=4)
    return out


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
                  config: Optional[MoETileConfig] = None) -> torch.Tensor:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights/ids [T, k] -> [T, H] in
    hidden's dtype: sum over each token's experts in [0, E) of weight * expert MLP(h).
    `config` overrides the tile lookup (the tuner's way in)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    _check_experts(hidden, w13, w2, topk_weights, topk_ids, activation)
    out = torch.empty_like(hidden)
    if num_tokens == 0:
        return out
    cfg = config or tile_config(num_tokens, num_experts, topk_ids.shape[1], inter, hidden_size,
                                hidden.dtype, hidden.device)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    plan = plan_experts(ids, num_experts, cfg.block_m)
    inter_act = gate_up_gemm(hidden, w13, plan, cfg.gate_up, activation)
    slot_out = down_gemm(inter_act, w2, topk_weights.to(torch.float32).contiguous(), plan,
                         cfg.down)
    return sum_slots(slot_out, ids, num_experts, out)


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, routing: MoERouting,
              correction_bias: Optional[torch.Tensor] = None, activation: str = "silu"
              ) -> torch.Tensor:
    """fused_experts over the experts `moe_select_experts` picks."""
    weights, ids = moe_select_experts(router_logits, routing, correction_bias)
    return fused_experts(hidden, w13, w2, weights, ids, activation)


def _check_experts(hidden, w13, w2, topk_weights, topk_ids, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_experts: activation {activation!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}")
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, w13_hidden = w13.shape
    if (w13_hidden != hidden_size or tuple(w2.shape) != (num_experts, hidden_size, two_inter // 2)
            or two_inter % 2):
        raise ValueError(f"fused_experts: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do "
                         f"not fit hidden size {hidden_size} ([E, 2I, H] and [E, H, I])")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"fused_experts: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [{num_tokens}, k]")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"fused_experts: topk_ids must be integers, not {topk_ids.dtype}")
