"""Conformance check for the contract members the other checks do not exercise: discovery
attributes, capabilities, configuration answers, KV-cache allocation, seeding and peak
memory.

Rule: check what the core relies on (types, invariants, that a setting the platform cannot
run is refused with a sentence), not particular values.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from platforms.config import PlatformConfig
from platforms.interface import PLATFORM_API_VERSION, Capabilities, Platform
from platforms.scheduling import StaticBatching
from platforms.testing.graph import make_platform_config


def check_contract(platform: Platform, config: Optional[PlatformConfig] = None) -> None:
    """Raise AssertionError naming the member whose answer breaks the contract."""
    cls = type(platform)
    for attr, value, kind in (("name", cls.name, str), ("device_type", cls.device_type, str),
                              ("priority", cls.priority, int),
                              ("api_version", cls.api_version, int)):
        if not isinstance(value, kind):
            raise AssertionError(f"{cls.__name__}.{attr} must be a {kind.__name__}")
    if platform.api_version != PLATFORM_API_VERSION:
        raise AssertionError(f"api_version is {platform.api_version}; this kit checks "
                             f"contract version {PLATFORM_API_VERSION}")
    if cls.is_available() is not True:
        raise AssertionError("is_available() must be True where the platform is checked")
    _check_capabilities(platform.capabilities)

    config = config or make_platform_config(platform)
    for asked in (torch.float32, torch.bfloat16, torch.float16):
        resolved = platform.resolve_dtype(asked)
        if resolved not in platform.capabilities.dtypes:
            raise AssertionError(f"resolve_dtype({asked}) gave {resolved}, which is not in "
                                 f"capabilities.dtypes {platform.capabilities.dtypes}")
    problems = platform.validate(config)
    if problems:
        raise AssertionError(f"validate() refused a small config it should run: {problems}")
    unsupported = next((d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
                        if d not in platform.capabilities.dtypes), None)
    if unsupported is not None:
        refused = platform.validate(_with_dtype(config, unsupported))
        if not refused or not all(isinstance(p, str) and p for p in refused):
            raise AssertionError(f"validate() accepted dtype {unsupported}, which is not in "
                                 "capabilities.dtypes (it must return a sentence saying so)")
    constraints = platform.scheduling_constraints(config)
    if constraints is not None and not isinstance(constraints, StaticBatching):
        raise AssertionError("scheduling_constraints() must return None or a StaticBatching, "
                             f"got {type(constraints).__name__}")
    info = platform.describe()
    if not isinstance(info, dict) or info.get("device_type") != platform.device_type:
        raise AssertionError("describe() must be a dict naming device_type")

    device = platform.device()
    cache = platform.allocate_kv_cache((2, 4, 16, 2, 32), config.dtype, device)
    if cache.shape != (2, 4, 16, 2, 32) or cache.dtype != config.dtype:
        raise AssertionError(f"allocate_kv_cache gave {tuple(cache.shape)} {cache.dtype}")
    if cache.device.type != platform.device_type or not bool(torch.isfinite(cache).all()):
        raise AssertionError("allocate_kv_cache must give finite values on the device")

    draws = []
    for _ in range(2):
        platform.seed_everything(99)
        draws.append(torch.rand(16, device=device).cpu())
    if not torch.equal(draws[0], draws[1]):
        raise AssertionError("seed_everything(seed) did not make torch.rand repeat")

    platform.reset_peak_memory()
    held = torch.empty(16 * 2**20, dtype=torch.uint8, device=device).fill_(1)
    platform.synchronize()
    peak = platform.peak_memory_bytes()
    if not isinstance(peak, int) or peak < 0:
        raise AssertionError(f"peak_memory_bytes() gave {peak!r}; need an int >= 0")
    if platform.capabilities.measures_peak_memory and peak < held.numel():
        raise AssertionError(f"peak_memory_bytes() is {peak} after 16 MiB were allocated, "
                             "though capabilities.measures_peak_memory is set")


def _check_capabilities(caps: object) -> None:
    if not isinstance(caps, Capabilities):
        raise AssertionError("capabilities must be a platforms.interface.Capabilities")
    if not caps.dtypes or not all(isinstance(d, torch.dtype) for d in caps.dtypes):
        raise AssertionError(f"capabilities.dtypes must list torch dtypes, got {caps.dtypes}")
    if caps.head_sizes is not None and not all(isinstance(h, int) and h > 0
                                               for h in caps.head_sizes):
        raise AssertionError(f"capabilities.head_sizes must be positive ints or None, "
                             f"got {caps.head_sizes}")
    if not isinstance(caps.distributed_backend, str) or not caps.distributed_backend:
        raise AssertionError("capabilities.distributed_backend must name a torch backend")
    if caps.default_max_num_seqs < 1:
        raise AssertionError("capabilities.default_max_num_seqs must be at least 1")
    if caps.default_kv_cache_memory is not None and caps.default_kv_cache_memory < 1:
        raise AssertionError("capabilities.default_kv_cache_memory must be positive or None")
    for flag in ("pinned_memory", "executes_asynchronously", "measures_peak_memory",
                 "inference_mode"):
        if not isinstance(getattr(caps, flag), bool):
            raise AssertionError(f"capabilities.{flag} must be a bool")
    for value in (caps.graph_capture, caps.ray_device_resource):
        if value is not None and not isinstance(value, str):
            raise AssertionError("capabilities.graph_capture and .ray_device_resource are "
                                 "strings or None")


def _with_dtype(config: PlatformConfig, dtype: torch.dtype) -> PlatformConfig:
    return dataclasses.replace(config, dtype=dtype)
