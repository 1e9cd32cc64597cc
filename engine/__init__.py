"""engine: a fast, hardware-agnostic LLM inference and serving engine.

Public names are imported lazily so that torch-free parts (the scheduler, the KV-cache
manager) can be imported without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "engine.entrypoints.llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutputKind": "engine.sampling_params",
    "EngineArgs": "engine.engine_args",
    "RequestOutput": "engine.outputs.request_output",
    "CompletionOutput": "engine.outputs.request_output",
    "RequestFailedError": "engine.outputs.request_output",
    "RequestRefusedError": "engine.outputs.request_output",
    "InvalidParameter": "engine.sampling_params",
    "LoRARequest": "engine.messages.core",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
