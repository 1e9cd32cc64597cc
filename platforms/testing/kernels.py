"""Conformance check for a platform's kernel overrides: each equals the torch reference.

Rule: every `KernelImpl` the platform offers is run on the platform's device with fresh
random inputs of several shapes (including the non-contiguous q/k views a model passes),
and compared with `platforms.kernels.REFERENCE` computed in float64 then cast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from platforms.interface import Platform
from platforms.kernels import REFERENCE

_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Ops that write their first argument and return nothing.
IN_PLACE = frozenset({"apply_token_bitmask"})


def _cases(name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator
           ) -> list[tuple[Any, ...]]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

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
                for e, g in zip(expected, got, strict=True):
                    if g.shape != e.shape or g.dtype != dtype:
                        raise AssertionError(
                            f"{impl.name} ({impl.provider}) returned {tuple(g.shape)} {g.dtype}; "
                            f"expected {tuple(e.shape)} {dtype}"
                        )
                    g = g.to("cpu", torch.float64)
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
