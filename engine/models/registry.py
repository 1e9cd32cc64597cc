"""Model classes by the HF `architectures` name in config.json.

Rule: one table, imported lazily so that asking "is this supported?" costs no model import.
An unknown architecture is a ValueError that lists the supported ones.
"""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.qwen3", "Qwen3ForCausalLM"),
}


# HF model_type -> architecture, for configs saved without an `architectures` list.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(architectures: list[str] | None, model_type: str | None = None) -> str:
    """The first supported name of a config's `architectures` list (or, when the list is
    absent, the causal LM of its `model_type`), else ValueError."""
    for arch in architectures or []:
        if arch in _MODELS:
            return arch
    if not architectures and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"Model architecture {architectures!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}."
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    module_name, class_name = _MODELS[check_architecture([architecture])]
    return getattr(importlib.import_module(module_name), class_name)
