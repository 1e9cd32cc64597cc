"""Named kernel overrides: resolved by priority per platform, through the `engine_kernels`
hook of real plugins and `Platform.kernel_overrides`, and used by the model layers."""

from __future__ import annotations

import pytest
import torch

from platforms.cpu.platform import CpuPlatform
from platforms.hookspecs import hookimpl
from platforms.kernels import REFERENCE, KernelImpl, kernel, resolve_kernels, use_kernels
from platforms.registry import PlatformRegistry

CALLS: list[str] = []


def counting_rms_norm(x, weight, eps):
    CALLS.append("rms_norm")
    return REFERENCE["rms_norm"](x, weight, eps)


def other_rms_norm(x, weight, eps):
    return REFERENCE["rms_norm"](x, weight, eps)


class KernelPlugin:
    def __init__(self, *impls: KernelImpl) -> None:
        self.impls = impls

    @hookimpl
    def engine_kernels(self) -> list[KernelImpl]:
        return list(self.impls)


def registry_with(*plugins) -> PlatformRegistry:
    reg = PlatformRegistry(allow=frozenset())
    for i, plugin in enumerate(plugins):
        reg.register_plugin(plugin, f"kernels-{i}", f"dist-{i}")
    return reg


def test_hook_override_wins_over_reference_on_its_platform_only():
    impl = KernelImpl("rms_norm", counting_rms_norm, 7, "fast-kernels", frozenset({"cpu"}))
    reg = registry_with(KernelPlugin(impl))
    table = reg.kernel_table(CpuPlatform())
    assert table["rms_norm"] is counting_rms_norm and table.providers["rms_norm"] == "fast-kernels"
    # Ops the plugin does not offer stay what the platform resolves on its own.
    own = resolve_kernels("cpu", CpuPlatform().kernel_overrides())
    assert table["silu_and_mul"] is own["silu_and_mul"]
    other = resolve_kernels("cuda", [impl])
    assert other["rms_norm"] is REFERENCE["rms_norm"]


def test_highest_priority_wins_and_ties_are_an_error_naming_both():
    low = KernelImpl("rms_norm", other_rms_norm, 3, "low-kernels")
    high = KernelImpl("rms_norm", counting_rms_norm, 9, "high-kernels")
    assert registry_with(KernelPlugin(low), KernelPlugin(high)).kernel_table(
        CpuPlatform())["rms_norm"] is counting_rms_norm
    tie = KernelImpl("rms_norm", other_rms_norm, 9, "tie-kernels")
    with pytest.raises(RuntimeError, match="high-kernels and tie-kernels|tie-kernels and high"):
        registry_with(KernelPlugin(high), KernelPlugin(tie)).kernel_table(CpuPlatform())


def test_bad_impls_are_clear_errors():
    with pytest.raises(ValueError, match="not a known op"):
        KernelImpl("layer_norm", other_rms_norm, 1, "x")
    with pytest.raises(ValueError, match="priority above 0"):
        KernelImpl("rms_norm", other_rms_norm, 0, "x")

    class Wrong:
        @hookimpl
        def engine_kernels(self):
            return [other_rms_norm]

    with pytest.raises(TypeError, match="expected platforms.kernels.KernelImpl"):
        registry_with(Wrong()).kernel_table(CpuPlatform())


def test_platform_overrides_reach_the_model_layers():
    from engine.models.layers.layernorm import RMSNorm

    class CountingPlatform(CpuPlatform):
        name = "counting"

        def kernel_overrides(self):
            return [KernelImpl("rms_norm", counting_rms_norm, 5, "counting")]

    table = registry_with().kernel_table(CountingPlatform())
    with use_kernels(table):
        norm = RMSNorm(16)
        assert kernel("rms_norm") is counting_rms_norm
    assert kernel("rms_norm") is REFERENCE["rms_norm"]  # nothing outlives the block
    CALLS.clear()
    out = norm(torch.randn(3, 16))
    assert CALLS == ["rms_norm"] and out.shape == (3, 16)
    assert RMSNorm(16)._norm is REFERENCE["rms_norm"]
