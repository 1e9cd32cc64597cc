"""Ceilings measured on the running device, and the rooflines a benchmark is judged against.

Rule: a ceiling is measured in the same run as the benchmark, through the platform (its
device, events and synchronize), never taken from a datasheet: device copy bandwidth
(bytes read + written by one large tensor copy / time) and bf16 matmul rate (2·n³ flop of an
n×n×n product on random data / time), each the median over timed repetitions after warm-up.

* bandwidth roofline (batch-1 decode): each step reads every weight once, except the input
  embedding, of which it gathers one row; time per token >= decode_weight_bytes / bandwidth.
* compute roofline (throughput): each token costs 2 flop per non-embedding parameter;
  tokens/s <= matmul_rate / (2 * non_embedding_params).

Mixture-of-experts layers count their *active* experts only: a token reads and multiplies
through top_k of the num_experts experts, so their weights count top_k / num_experts of
their size (the active-bytes roofline of a batch-1 decode step).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written per second
    matmul_flop_per_s: float  # dense bf16 (or the given dtype) matmul rate
    copy_bytes: int  # size of the copied tensor
    matmul_size: int  # n of the n x n x n product

    def lines(self) -> list[str]:
        return [
            f"device copy bandwidth: {self.copy_bytes_per_s / 1e9:.0f} GB/s "
            f"(copy of {self.copy_bytes / 2**20:.0f} MiB, read + written)",
            f"matmul rate: {self.matmul_flop_per_s / 1e12:.4g} TFLOP/s "
            f"({self.matmul_size}^3, random data)",
        ]


def _time_ms(platform, fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median device time of `fn` over `iters` runs, each between two platform events."""
    for _ in range(warmup):
        fn()
    platform.synchronize()
    times = []
    for _ in range(iters):
        start, end = platform.create_event(), platform.create_event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_ms(end))
    return statistics.median(times)


def copy_bandwidth(platform, num_bytes: int = 1 << 30, warmup: int = 3, iters: int = 10) -> float:
    """Bytes per second one device-to-device copy moves, counting the read and the write."""
    device = platform.device()
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    ms = _time_ms(platform, lambda: dst.copy_(src), warmup, iters)
    return 2 * num_bytes / (ms / 1000.0)


def matmul_rate(platform, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                warmup: int = 3, iters: int = 10) -> float:
    """Flop per second of an n x n x n product on random data (zeros run faster)."""
    device = platform.device()
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = _time_ms(platform, lambda: torch.matmul(a, b, out=out), warmup, iters)
    return 2 * n**3 / (ms / 1000.0)


def measure(platform, copy_bytes: int = 1 << 30, matmul_size: int = 8192) -> Ceilings:
    with torch.inference_mode():
        bandwidth = copy_bandwidth(platform, copy_bytes)
        rate = matmul_rate(platform, matmul_size)
    return Ceilings(bandwidth, rate, copy_bytes, matmul_size)


def _weights_read_per_step(model: nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """Parameters a decode step reads, each with the fraction of it one token reads: all but
    an input embedding that is not also the output head (a tied head reads the whole
    table); an MoE layer's experts top_k / num_experts."""
    params = dict(model.named_parameters())
    has_own_head = any(name.endswith("lm_head.weight") for name in params)
    fraction: dict[str, float] = {}
    for prefix, module in model.named_modules():
        top_k, num_experts = getattr(module, "routing", None), getattr(module, "num_experts", 0)
        if top_k is not None and num_experts:
            for name, _ in module.named_parameters(prefix=prefix):
                fraction[name] = min(1.0, top_k.top_k / num_experts)
    return {
        name: (p, fraction.get(name, 1.0)) for name, p in params.items()
        if not (name.endswith("embed_tokens.weight") and has_own_head)
    }


def add_ceiling_args(parser, *, default: bool, measures: str) -> None:
    """The flags both benchmarks share for measuring the device's ceilings in the run."""
    import argparse

    parser.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=default,
                        help="Measure copy bandwidth and matmul rate in this run and print "
                        f"the {measures}.")
    parser.add_argument("--roofline-copy-mib", type=int, default=1024,
                        help="Size of the tensor copied to measure bandwidth.")
    parser.add_argument("--roofline-matmul-size", type=int, default=8192,
                        help="n of the n x n x n bf16 product that measures the matmul rate.")


def counted_model(llm) -> nn.Module:
    """The model whose parameters the rooflines count: the engine's own when it runs in this
    process, else (workers in other processes) the same architecture built on the meta
    device, which allocates nothing."""
    runner = getattr(llm.core.executor, "runner", None)
    if runner is not None and runner.model is not None:
        return runner.model
    from engine.models.registry import get_model_class

    cfg = llm.config.model
    previous = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device("meta"):
            return get_model_class(cfg.architecture)(cfg.hf_config)
    finally:
        torch.set_default_dtype(previous)


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads (the input embedding excepted, only
    the active experts of an MoE layer)."""
    return int(sum(p.numel() * p.element_size() * f
                   for p, f in _weights_read_per_step(model).values()))


def non_embedding_params(model: nn.Module) -> int:
    """Parameters every token multiplies through (input embedding excepted, head included,
    only the active experts of an MoE layer)."""
    return int(sum(p.numel() * f for p, f in _weights_read_per_step(model).values()))


@dataclass(frozen=True)
class Roofline:
    """A ceiling for one metric and how close a measurement came to it."""

    name: str
    ceiling: float
    achieved: float
    unit: str
    higher_is_better: bool

    @property
    def percent(self) -> float:
        ratio = self.achieved / self.ceiling if self.higher_is_better else (
            self.ceiling / self.achieved)
        return 100.0 * ratio

    def line(self) -> str:
        return (f"{self.name}: roofline {self.ceiling:.3f} {self.unit}, achieved "
                f"{self.achieved:.3f} {self.unit} = {self.percent:.1f}% of the roofline")


def bandwidth_roofline(weight_bytes: int, ceilings: Ceilings, tpot_s: float) -> Roofline:
    """Batch-1 decode: the fastest a step can be is reading the weights once."""
    return Roofline("bandwidth (time per output token)",
                    1000.0 * weight_bytes / ceilings.copy_bytes_per_s, 1000.0 * tpot_s, "ms",
                    higher_is_better=False)


def compute_roofline(num_params: int, ceilings: Ceilings, tokens_per_s: float) -> Roofline:
    """Throughput: 2 flop per non-embedding parameter per token (prompt or output)."""
    return Roofline("compute (total tokens/s)", ceilings.matmul_flop_per_s / (2 * num_params),
                    tokens_per_s, "tok/s", higher_is_better=True)


def startup_line(timings: dict[str, float]) -> str:
    """`load + profile + capture` as the engine core timed them (names as the core uses)."""
    names = {"load": "load", "kv_cache": "profile + KV cache", "warmup": "warm-up + capture"}
    parts = ", ".join(f"{names.get(k, k)} {v:.2f} s" for k, v in timings.items())
    return f"startup: {sum(timings.values()):.2f} s ({parts})"
