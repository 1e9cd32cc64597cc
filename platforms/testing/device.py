"""Conformance checks for a platform's device and memory answers.

Rule: check what the core relies on (types, ranges, reproducibility), not particular values:
a platform's memory numbers differ from machine to machine.
"""

from __future__ import annotations

import torch

from platforms.interface import Platform


def check_memory_info(platform: Platform) -> tuple[int, int]:
    """memory_info() gives ints with 0 < free <= total; returns them."""
    free, total = platform.memory_info()
    if not (isinstance(free, int) and isinstance(total, int)):
        raise AssertionError(f"memory_info() must return ints, got {type(free)}, {type(total)}")
    if not 0 < free <= total:
        raise AssertionError(f"memory_info() gave free={free}, total={total}; need 0 < free <= total")
    if total < 2**20:
        raise AssertionError(f"memory_info() total={total} bytes is below 1 MiB; not plausible")
    return free, total


def check_device(platform: Platform) -> None:
    """device() matches device_type, device_count() >= 1, and seeded generators repeat."""
    device = platform.device()
    if device.type != platform.device_type:
        raise AssertionError(f"device() is {device}, but device_type is {platform.device_type!r}")
    if platform.device_count() < 1:
        raise AssertionError(f"device_count() is {platform.device_count()}; need at least 1")
    platform.set_device(device)
    draws = []
    for _ in range(2):
        gen = platform.make_generator(1234)
        draws.append(torch.rand(8, generator=gen, device=device).cpu())
    platform.synchronize()
    if not torch.equal(draws[0], draws[1]):
        raise AssertionError("make_generator(seed) gave different numbers for the same seed")


def check_events(platform: Platform) -> float:
    """Two events around queued work: elapsed_ms is finite and non-negative; returns it."""
    device = platform.device()
    start, end = platform.create_event(), platform.create_event()
    x = torch.randn(256, 256, device=device)
    start.record()
    for _ in range(4):
        x = x @ x.T / 256
    end.record()
    end.synchronize()
    elapsed = start.elapsed_ms(end)
    if not 0.0 <= elapsed < 60_000:
        raise AssertionError(f"create_event(): elapsed_ms gave {elapsed}; need 0 <= ms < 60000")
    return elapsed
