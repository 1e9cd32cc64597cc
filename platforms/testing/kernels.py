"""Conformance check for a platform's kernel overrides: each equals the torch reference.

Rule: every `KernelImpl` the platform offers is run on the platform's device with fresh
random inputs of several shapes (including the non-contiguous q/k views a model passes),
and compared with `platforms.kernels.REFERENCE` computed in float64 then cast.

The LoRA ops get mixed batches (tokens of several adapter slots and of none, a slot no
token uses, one slice and three); `lora_shrink`'s output is float32 whatever x's dtype.

The MoE ops get router logits whose values in a row are distinct in every dtype (a shuffled
ladder), so the experts chosen can differ from the reference's only by a bug, not by a tie;
`moe_select_experts` is compared row by row sorted by expert id (any column order is
allowed), its outputs are float32 weights and int32 ids whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from platforms.interface import Platform
from platforms.kernels import REFERENCE, MoERouting

_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Ops that write their first argument and return nothing.
IN_PLACE = frozenset({"apply_token_bitmask", "lora_expand"})
# Ops whose outputs have fixed dtypes, not the inputs' dtype.
_OUTPUT_DTYPES = {"moe_select_experts": (torch.int32, torch.float32),  # as compared: ids first
                  "lora_shrink": (torch.float32,)}
# (experts, routing, with correction bias) for the router and the whole block.
_ROUTINGS = (
    (8, MoERouting(top_k=2, renormalize=True), False),  # Mixtral
    (16, MoERouting(top_k=4, renormalize=False), False),  # Qwen2-MoE
    (64, MoERouting(top_k=8, renormalize=True), False),  # Qwen3-MoE (128 in the real one)
    (16, MoERouting(top_k=3, scoring="sigmoid", renormalize=True), True),
    (32, MoERouting(top_k=4, renormalize=True, num_expert_group=4, topk_group=2), False),
    (64, MoERouting(top_k=6, scoring="sigmoid", renormalize=True, num_expert_group=8,
                    topk_group=4, routed_scaling_factor=2.5), True),  # DeepSeek-V3-shaped
)


def _router_logits(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """[T, E]: each row a shuffle of a ladder with steps of 4 / E (exact in bf16 too)."""
    rows = [torch.randperm(experts, generator=gen) for _ in range(tokens)]
    return torch.stack(rows).float() * (4.0 / experts) - 2.0


def _moe_cases(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator
               ) -> list[tuple[Any, ...]]:
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    cases: list[tuple[Any, ...]] = []
    for i, (experts, routing, with_bias) in enumerate(_ROUTINGS):
        tokens = (1, 5, 33)[i % 3]  # one token: most experts receive none
        logits = _router_logits(tokens, experts, gen).to(device=device, dtype=dtype)
        bias = (torch.randn(experts, generator=gen) * 0.1).to(device) if with_bias else None
        if name == "moe_select_experts":
            cases.append((logits, routing, bias))
        elif name == "fused_moe":
            hidden, inter = (64, 32) if i % 2 else (128, 96)
            cases.append((rand(tokens, hidden), logits,
                          rand(experts, 2 * inter, hidden, scale=hidden**-0.5),
                          rand(experts, hidden, inter, scale=inter**-0.5), routing, bias))
    if name == "fused_experts":
        for tokens, hidden, inter, experts, k in ((1, 64, 32, 8, 2), (7, 128, 64, 16, 4),
                                                  (33, 256, 96, 8, 2)):
            ids = torch.stack([torch.randperm(experts, generator=gen)[:k]
                               for _ in range(tokens)])
            ids[ids >= experts - 2] = -1  # the last two experts live on another EP rank
            weights = torch.rand(tokens, k, generator=gen).to(device)
            cases.append((rand(tokens, hidden), rand(experts, 2 * inter, hidden, scale=hidden**-0.5),
                          rand(experts, hidden, inter, scale=inter**-0.5), weights,
                          ids.to(device=device, dtype=torch.int32)))
    return cases


def _lora_cases(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator
                ) -> list[tuple[Any, ...]]:
    """Mixed batches: slots 0..2 and -1 (base model) among the tokens, slot 3 used by none;
    one slice and three of different sizes (q, k, v); ranks 8 and 16."""
    num_slots, hidden = 4, 128
    cases: list[tuple[Any, ...]] = []
    for tokens, slice_sizes, rank in ((1, (64, 16, 16), 8), (7, (96,), 16),
                                      (64, (64, 16, 16), 16), (64, (32,), 8)):
        num_slices = len(slice_sizes)
        slot_ids = torch.randint(-1, num_slots - 1, (tokens,), generator=gen,
                                 dtype=torch.int32)
        if tokens == 1:
            slot_ids.fill_(2)  # one token with an adapter (decode of a single request)
        slot_ids = slot_ids.to(device)
        lora_a = (torch.randn(num_slices, num_slots, rank, hidden, generator=gen)
                  * hidden**-0.5).to(device=device, dtype=dtype)
        if name == "lora_shrink":
            x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
            cases.append((x, lora_a, slot_ids))
        else:
            lora_b = (torch.randn(num_slices, num_slots, max(slice_sizes), rank, generator=gen)
                      * rank**-0.5).to(device=device, dtype=dtype)
            buf = torch.randn(num_slices, tokens, rank, generator=gen).to(device)  # float32
            y = torch.randn(tokens, sum(slice_sizes), generator=gen).to(device=device,
                                                                        dtype=dtype)
            cases.append((y, buf, lora_b, slot_ids, slice_sizes))
    return cases


def _sorted_by_expert(out: list[torch.Tensor]) -> list[torch.Tensor]:
    """(weights, ids) -> [ids, weights], each row's columns in ascending id order (ids
    first: a wrong choice is reported as such, not as a weight error)."""
    weights, ids = out
    order = ids.long().argsort(dim=-1)
    return [ids.gather(1, order), weights.gather(1, order)]


def _cases(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator
           ) -> list[tuple[Any, ...]]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if name in ("moe_select_experts", "fused_experts", "fused_moe"):
        return _moe_cases(name, dtype, device, gen)
    if name in ("lora_shrink", "lora_expand"):
        return _lora_cases(name, dtype, device, gen)
    cases: list[tuple[Any, ...]] = []
    for tokens, hidden in ((1, 64), (7, 576), (33, 1024)):
        if name == "rms_norm":
            cases.append((rand(tokens, hidden), rand(hidden), 1e-5))
        elif name == "fused_add_rms_norm":
            cases.append((rand(tokens, hidden), rand(tokens, hidden), rand(hidden), 1e-6))
        elif name in ("silu_and_mul", "gelu_tanh_and_mul"):
            cases.append((rand(tokens, 2 * hidden),))
    if name == "rms_norm":  # tiny activations, where eps matters as much as the values
        cases.append((rand(5, 256) * 1e-3, rand(256), 1e-6))
    if name == "fused_add_rms_norm":
        cases.append((rand(5, 256) * 1e-3, rand(5, 256) * 1e-3, rand(256), 1e-6))
    if name == "apply_token_bitmask":
        for rows, vocab, masked in ((1, 40, 1), (6, 1000, 3), (9, 49152, 9)):
            words = (vocab + 31) // 32
            bitmask = torch.randint(-2**31, 2**31 - 1, (masked, words), generator=gen,
                                    dtype=torch.int64).to(torch.int32).to(device)
            which = torch.randperm(rows, generator=gen)[:masked].to(device)
            cases.append((rand(rows, vocab), bitmask, which))
    if name == "rotary_embedding":
        for tokens, heads, kv_heads, head in ((1, 4, 2, 64), (9, 9, 3, 64), (17, 8, 2, 128)):
            qkv = rand(tokens, (heads + 2 * kv_heads) * head)  # views of a merged projection
            q = qkv[:, : heads * head].view(tokens, heads, head)
            k = qkv[:, heads * head : (heads + kv_heads) * head].view(tokens, kv_heads, head)
            freqs = torch.rand(300, head // 2, generator=gen) * 3
            cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
            positions = torch.randint(0, 300, (tokens,), generator=gen).to(device)
            cases.append((positions, q, k, cache))
    return cases


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to("cpu", torch.float64)
    if isinstance(x, torch.Tensor):
        return x.to("cpu")
    return x


def _flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_kernel_overrides(platform: Platform, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                           seed: int = 0) -> dict[str, float]:
    """Raise AssertionError naming the op, dtype and error on a mismatch; return worst errors."""
    gen = torch.Generator().manual_seed(seed)
    device = platform.device()
    worst: dict[str, float] = {}
    for impl in platform.kernel_overrides():
        ref: Callable[..., Any] = REFERENCE[impl.name]
        for dtype in dtypes:
            for args in _cases(impl.name, dtype, device, gen):
                # The reference runs on float64 copies first: an override may work in place
                # on its (possibly non-contiguous) inputs.
                if impl.name in IN_PLACE:
                    expected = [_to64(args[0]).clone()]
                    ref(expected[0], *[_to64(a) for a in args[1:]])
                    got = [args[0].clone()]
                    impl.fn(got[0], *args[1:])
                else:
                    expected = _flat(ref(*[_to64(a) for a in args]))
                    got = _flat(impl.fn(*args))
                platform.synchronize()
                want_dtypes = _OUTPUT_DTYPES.get(impl.name, (dtype,) * len(expected))
                if impl.name == "moe_select_experts":
                    expected = _sorted_by_expert(expected)
                    got = _sorted_by_expert([g.to("cpu") for g in got])
                for e, g, want_dtype in zip(expected, got, want_dtypes, strict=True):
                    if g.shape != e.shape or g.dtype != want_dtype:
                        raise AssertionError(
                            f"{impl.name} ({impl.provider}) returned {tuple(g.shape)} {g.dtype}; "
                            f"expected {tuple(e.shape)} {want_dtype}"
                        )
                    if not g.is_floating_point():
                        if not torch.equal(g.to("cpu"), e.to("cpu")):
                            raise AssertionError(f"{impl.name} ({impl.provider}, {dtype}) "
                                                 "chose other experts than the reference")
                        continue
                    g, e = g.to("cpu", torch.float64), e.to("cpu", torch.float64)
                    if not torch.equal(torch.isinf(g), torch.isinf(e)):
                        raise AssertionError(f"{impl.name} ({impl.provider}, {dtype}) masks "
                                             "other entries than the reference")
                    g, e = g.nan_to_num(neginf=0.0), e.nan_to_num(neginf=0.0)
                    scale = max(1.0, float(e.abs().max()))
                    err = float((g - e).abs().max()) / scale
                    worst[impl.name] = max(worst.get(impl.name, 0.0), err)
                    if not err <= _TOLERANCE.get(dtype, 2e-2):
                        raise AssertionError(
                            f"{impl.name} ({impl.provider}, {dtype}) differs from the reference "
                            f"by {err:.3g} (relative to max |ref|) on shape {tuple(e.shape)}"
                        )
    return worst
