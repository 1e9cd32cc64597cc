"""Named kernel overrides: a vendor swaps one op (rms_norm, rotary, ...) without touching models.

Rule: a model layer never calls an op directly; when it is built it looks the op up by name in
the kernel table that is current (`use_kernels`), and keeps the function it got. A table is
resolved once per engine for its platform: the torch reference of each name (priority 0),
then every `KernelImpl` the platform and the plugins offer for that platform; the highest
priority wins, and two providers at the same top priority are an error naming both. Nothing
is looked up per step, and nothing global outlives the `with` block that built a model.

The named ops and their signatures (every implementation must match the reference exactly
in meaning; dtypes are the model's):

* ``rms_norm(x [T, H], weight [H], eps) -> [T, H]``: normalise in float32, cast back to x's
  dtype, then multiply by weight.
* ``fused_add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)``.
* ``rotary_embedding(positions [T], q [T, Hq, D], k [T, Hk, D], cos_sin_cache [P, D] float32)
  -> (q, k)``: neox layout (first half / second half), cos in the cache's first half and sin
  in its second; may rotate in place and return its inputs.
* ``silu_and_mul(x [T, 2d]) -> [T, d]``: silu(first half) * second half.
* ``gelu_tanh_and_mul(x [T, 2d]) -> [T, d]``: gelu with the tanh approximation (HF
  ``gelu_pytorch_tanh``, Gemma) of the first half * second half.
* ``apply_token_bitmask(logits [R, V] float, bitmask [K, W] int32, rows [K] int64) -> None``:
  in place, for each k, every logit of row ``rows[k]`` whose token t has bit ``t % 32`` of
  word ``bitmask[k, t // 32]`` clear becomes -inf (structured outputs: the tokens a grammar
  forbids); tokens past ``32 * W`` are forbidden; other rows are untouched.
* ``moe_select_experts(router_logits [T, E] float (any float dtype), routing: MoERouting,
  correction_bias: Optional[[E] float] = None) -> (topk_weights [T, k] float32, topk_ids
  [T, k] int32)``: the router of a mixture-of-experts block. Scores are softmax or sigmoid
  (``routing.scoring``) of the logits in float32. The choice uses scores + correction_bias
  (DeepSeek-V3's load-balancing bias, when given); the weights are the scores without it.
  With ``num_expert_group`` G and ``topk_group`` g the E experts form G equal groups; a
  group's score is its max score (no bias) or the sum of its top 2 biased scores (with
  bias), and only the experts of the top g groups may be chosen. Then ``torch.topk`` of
  ``top_k`` over the allowed experts (HF's choice), the weights gathered; ``renormalize``
  divides them by their sum; then times ``routed_scaling_factor``. Columns come in topk's
  order (descending); an implementation may order a row otherwise, ids and weights together.
  (Mixtral: softmax, top-k, renormalize; Qwen2-MoE: norm_topk_prob False, no renormalize;
  Qwen3-MoE: renormalize.)
* ``fused_experts(hidden [T, H], w13 [E_local, 2I, H], w2 [E_local, H, I], topk_weights
  [T, k] float32, topk_ids [T, k] int, activation: str = "silu") -> [T, H]`` in hidden's
  dtype: for each token t and slot j with 0 <= e = topk_ids[t, j] < E_local,
  out[t] += topk_weights[t, j] * w2[e] @ (act(w13[e, :I] @ h[t]) * (w13[e, I:] @ h[t]))
  (gate = first half of w13, up = second half; act "silu" or "gelu_pytorch_tanh"). An id
  outside [0, E_local) (-1: an expert another expert-parallel rank holds) adds nothing, and
  an expert that receives no token costs nothing. Each expert computes in hidden's dtype
  and its output is multiplied by its weight cast to that dtype (as HF's Qwen-MoE experts
  do); the reference adds the experts in ascending id order in that dtype, as HF's loop does.
* ``fused_moe(hidden, router_logits, w13, w2, routing, correction_bias=None,
  activation="silu") -> [T, H]`` = ``fused_experts(hidden, w13, w2, *moe_select_experts(
  router_logits, routing, correction_bias), activation)``: the whole routed-experts block,
  so a vendor can swap it in one piece. Shared experts are not inside: the model adds them
  (Qwen2-MoE: a shared expert MLP scaled by a sigmoid gate). With tensor parallelism w13/w2
  hold this rank's slice of each expert's intermediate dim, and the output is a partial sum.
* ``lora_shrink(x [T, H], lora_a [L, S, R, H], slot_ids [T] int32) -> [L, T, R] float32``:
  the first half of batched multi-LoRA (punica's shrink). For every slice l (L slices: q, k,
  v of a merged QKV layer, gate and up, or one for a plain linear) and token t whose adapter
  slot s = slot_ids[t] >= 0: out[l, t] = lora_a[l, s] @ x[t], accumulated in float32; rows
  of tokens with slot -1 (the base model) are zero. S adapter slots, R the largest rank
  (an adapter of lower rank is zero-padded, so it adds exact zeros).
* ``lora_expand(y [T, D], buf [L, T, R] float32, lora_b [L, S, Dmax, R], slot_ids [T] int32,
  slice_sizes: tuple[int, ...]) -> None``: the second half (punica's expand), in place. For
  each slice l at column offset o_l = sum(slice_sizes[:l]) and token t with slot s >= 0:
  y[t, o_l : o_l + slice_sizes[l]] += (lora_b[l, s, :slice_sizes[l]] @ buf[l, t]) summed in
  float32 and cast once to y's dtype; tokens with slot -1 are untouched. D is
  sum(slice_sizes), Dmax >= max(slice_sizes). The adapter's scaling (lora_alpha / r, or
  rsLoRA's lora_alpha / sqrt(r)) is folded into lora_b when it is loaded: no scale here.
  An implementation must not make the host wait for the device nor size anything by the
  slot values, so a captured graph replays with new slot_ids (the reference, which groups
  tokens by slot on the host, is not capturable).

History: v1 rms_norm to apply_token_bitmask; v2 adds moe_select_experts, fused_experts and
fused_moe (and the `MoERouting` dataclass they take); v3 adds lora_shrink and lora_expand.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

# ---- torch references (priority 0, every platform) ----


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    return rms_norm(x, weight, eps), x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D // 2] float32 -> x rotated, in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # Written into one output buffer: no temporaries per term and no final cat.
    out = torch.empty_like(x32)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out.to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place on silu's fresh output: one buffer, not two


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
                        ) -> None:
    vocab = logits.shape[-1]
    # Bit t % 32 of word t // 32 is bit t % 8 of little-endian byte t // 8: unpack bytes,
    # one byte per token (an int32 per token made this op 6x slower on a 128k vocabulary).
    data = bitmask.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    if sys.byteorder == "big":
        data = data.view(-1, 4).flip(-1).reshape(data.shape)
    allowed = ((data.unsqueeze(-1) >> shifts) & 1).view(torch.bool).reshape(len(bitmask), -1)
    if allowed.shape[1] < vocab:
        allowed = F.pad(allowed, (0, vocab - allowed.shape[1]))
    forbidden = ~allowed[:, :vocab]
    if len(rows) == len(logits) and torch.equal(rows, torch.arange(len(rows), device=rows.device)):
        logits.masked_fill_(forbidden, float("-inf"))  # every row, in order: no gather
        return
    selected = logits.index_select(0, rows)
    selected.masked_fill_(forbidden, float("-inf"))
    logits.index_copy_(0, rows, selected)


@dataclass(frozen=True)
class MoERouting:
    """How a mixture-of-experts router picks each token's experts (see the module docstring)."""

    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = False
    num_expert_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE scoring {self.scoring!r}: choose 'softmax' or 'sigmoid'.")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("MoE grouped routing needs both num_expert_group and topk_group "
                             f"(got {self.num_expert_group} and {self.topk_group}).")


def moe_select_experts(router_logits: torch.Tensor, routing: MoERouting,
                       correction_bias: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if routing.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if routing.num_expert_group is not None:
        tokens, experts = scores.shape
        groups = choice.view(tokens, routing.num_expert_group, -1)  # [T, G, E / G]
        group_scores = (groups.max(dim=-1).values if correction_bias is None
                        else groups.topk(2, dim=-1).values.sum(dim=-1))
        top_groups = group_scores.topk(routing.topk_group, dim=-1).indices  # [T, g]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        allowed = allowed.unsqueeze(-1).expand_as(groups).reshape(tokens, experts)
        choice = choice.masked_fill(~allowed, float("-inf"))
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.routed_scaling_factor != 1.0:
        weights = weights * routing.routed_scaling_factor
    return weights, ids.to(torch.int32)


_EXPERT_ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  activation: str = "silu") -> torch.Tensor:
    act = _EXPERT_ACTIVATIONS[activation]
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1).long()
    mine = (flat_ids >= 0) & (flat_ids < num_experts)
    # Token slots grouped by expert (others last): one matmul per expert that has tokens.
    order = torch.where(mine, flat_ids, num_experts).argsort(stable=True)
    counts = torch.bincount(flat_ids[mine], minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1).to(hidden.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = slots // top_k
        gate, up = F.linear(hidden[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, w2[expert]) * weights[slots].unsqueeze(-1)
        out.index_add_(0, tokens, y)
    return out


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, routing: MoERouting,
              correction_bias: Optional[torch.Tensor] = None,
              activation: str = "silu") -> torch.Tensor:
    topk_weights, topk_ids = moe_select_experts(router_logits, routing, correction_bias)
    return fused_experts(hidden, w13, w2, topk_weights, topk_ids, activation)


def _tokens_by_slot(slot_ids: torch.Tensor, num_slots: int
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, its tokens [n] int64) for each slot some token uses, in slot order (tokens of
    slot -1 left out): sorted once, so each slot costs one matmul, not one per token."""
    ids = slot_ids.long()
    used = ids >= 0
    order = torch.where(used, ids, num_slots).argsort(stable=True)
    counts = torch.bincount(ids[used], minlength=num_slots).tolist()
    start = 0
    for slot, count in enumerate(counts):
        if count:
            yield slot, order[start:start + count]
            start += count


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    num_slices, num_slots, rank, _ = lora_a.shape
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 for float64 inputs)
    out = torch.zeros(num_slices, x.shape[0], rank, dtype=acc, device=x.device)
    for slot, tokens in _tokens_by_slot(slot_ids, num_slots):
        # [n, H] @ [L, H, R] -> [L, n, R]
        out[:, tokens] = torch.matmul(x[tokens].to(acc), lora_a[:, slot].to(acc).transpose(1, 2))
    return out


def lora_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor,
                slot_ids: torch.Tensor, slice_sizes: tuple[int, ...]) -> None:
    for slot, tokens in _tokens_by_slot(slot_ids, lora_b.shape[1]):
        offset = 0
        for index, size in enumerate(slice_sizes):
            # [n, R] @ [R, size] in buf's float dtype, cast once, added to the slice's columns.
            delta = torch.matmul(buf[index, tokens], lora_b[index, slot, :size].to(buf.dtype).T)
            y[:, offset:offset + size].index_add_(0, tokens, delta.to(y.dtype))
            offset += size


REFERENCE: Mapping[str, Callable[..., Any]] = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "apply_token_bitmask": apply_token_bitmask,
    "moe_select_experts": moe_select_experts,
    "fused_experts": fused_experts,
    "fused_moe": fused_moe,
    "lora_shrink": lora_shrink,
    "lora_expand": lora_expand,
}
KERNEL_NAMES: tuple[str, ...] = tuple(REFERENCE)


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of a named op, offered by a platform or a plugin.

    `platforms`: names of the platforms it runs on (None: any). `provider`: who offers it,
    shown by `engine plugins` and in errors.
    """

    name: str
    fn: Callable[..., Any]
    priority: int
    provider: str
    platforms: Optional[frozenset[str]] = None

    def __post_init__(self) -> None:
        if self.name not in REFERENCE:
            raise ValueError(
                f"Kernel {self.name!r} from {self.provider} is not a known op; "
                f"known ops: {', '.join(KERNEL_NAMES)}."
            )
        if self.priority <= 0:
            raise ValueError(
                f"Kernel {self.name!r} from {self.provider} has priority {self.priority}; "
                "overrides need a priority above 0 (0 is the torch reference)."
            )


@dataclass(frozen=True)
class KernelTable:
    """The resolved op for every name on one platform, and who provided each."""

    fns: Mapping[str, Callable[..., Any]]
    providers: Mapping[str, str]

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.fns[name]


REFERENCE_TABLE = KernelTable(dict(REFERENCE), {name: "reference" for name in REFERENCE})


def resolve_kernels(platform_name: str, impls: Iterable[KernelImpl]) -> KernelTable:
    """Pick, for each op name, the highest-priority implementation usable on the platform."""
    best: dict[str, KernelImpl] = {}
    for impl in impls:
        if impl.platforms is not None and platform_name not in impl.platforms:
            continue
        current = best.get(impl.name)
        if current is not None and current.priority == impl.priority and current.fn is not impl.fn:
            raise RuntimeError(
                f"Kernel {impl.name!r} on platform {platform_name!r} is offered at priority "
                f"{impl.priority} by both {current.provider} and {impl.provider}; one of them "
                "must change its priority, or leave one plugin out of ENGINE_PLUGINS."
            )
        if current is None or impl.priority > current.priority:
            best[impl.name] = impl
    fns = dict(REFERENCE)
    providers = {name: "reference" for name in REFERENCE}
    for name, impl in best.items():
        fns[name] = impl.fn
        providers[name] = impl.provider
    return KernelTable(fns, providers)


_current: contextvars.ContextVar[KernelTable] = contextvars.ContextVar(
    "engine_kernel_table", default=REFERENCE_TABLE
)


@contextlib.contextmanager
def use_kernels(table: KernelTable) -> Iterator[KernelTable]:
    """Make `table` current while models are built inside the block."""
    token = _current.set(table)
    try:
        yield table
    finally:
        _current.reset(token)


def kernel(name: str) -> Callable[..., Any]:
    """The current table's implementation of `name` (call at layer construction)."""
    return _current.get()[name]
