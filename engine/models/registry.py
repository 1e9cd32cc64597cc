"""Model classes by the HF `architectures` name in config.json.

Rule: one table, imported lazily so that asking "is this supported?" costs no model import.
An unknown architecture is a ValueError that lists the supported ones.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("engine.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("engine.models.gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("engine.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("engine.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}
# Architectures refused with a reason (rather than "not supported") before anything reads
# their config.
_REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "Gemma3ForConditionalGeneration (Gemma 3 with its vision tower) is not supported: "
        "this engine runs Gemma 3 text-only; use a text-only checkpoint (model_type "
        "gemma3_text, Gemma3ForCausalLM, e.g. gemma-3-1b or gemma-3-270m) or a GGUF file."),
}


# HF model_type -> architecture, for configs saved without an `architectures` list.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "gemma3": "Gemma3ForConditionalGeneration", "phi3": "Phi3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


# --model-impl choices, and the architecture name under which the transformers fallback
# (engine.models.transformers_fallback) builds any HF causal LM; not in `_MODELS`, so it is
# never listed as a native architecture.
MODEL_IMPLS = ("auto", "native", "transformers")
TRANSFORMERS_FALLBACK = "TransformersForCausalLM"


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(architectures: list[str] | None, model_type: str | None = None) -> str:
    """The first supported name of a config's `architectures` list (or, when the list is
    absent, the causal LM of its `model_type`), else ValueError."""
    for arch in architectures or []:
        if arch in _MODELS:
            return arch
    if not architectures and model_type in _BY_MODEL_TYPE:
        architectures = [_BY_MODEL_TYPE[model_type]]
        if architectures[0] in _MODELS:
            return architectures[0]
    for arch in architectures or []:
        if arch in _REFUSED:
            raise ValueError(_REFUSED[arch])
    raise ValueError(
        f"Model architecture {architectures!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}."
    )


def resolve_model_impl(hf_config: Any, model_impl: str, *, tensor_parallel_size: int = 1,
                       pipeline_parallel_size: int = 1) -> tuple[str, str]:
    """(the architecture `get_model_class` builds, "native" or "transformers") for
    --model-impl: 'native' takes only our classes; 'transformers' always runs the HF class
    through the transformers fallback; 'auto' prefers ours and falls back to transformers
    for an architecture we lack whose HF class the fallback can run. ValueError otherwise."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"--model-impl {model_impl!r}: choose one of {', '.join(MODEL_IMPLS)}.")
    from engine.models.transformers_fallback import (
        check_fallback,
        fallback_problems,
        hf_causal_lm_class,
    )

    if model_impl == "transformers":
        check_fallback(hf_config, tensor_parallel_size, pipeline_parallel_size)
        return TRANSFORMERS_FALLBACK, "transformers"
    try:
        return check_architecture(getattr(hf_config, "architectures", None),
                                  getattr(hf_config, "model_type", None)), "native"
    except ValueError as native_error:
        if any(arch in _REFUSED for arch in getattr(hf_config, "architectures", None) or []):
            raise  # refused for a reason the fallback does not lift
        problems = fallback_problems(hf_config)
        if model_impl == "native":
            hint = "" if problems else (
                f" Its transformers class {hf_causal_lm_class(hf_config).__name__} can run "
                "through the fallback: pass --model-impl auto or transformers.")
            raise ValueError(f"{native_error}{hint}") from None
        if problems:
            raise ValueError(f"{native_error} The transformers fallback (--model-impl auto) "
                             "cannot run it either: " + "; ".join(problems) + ".") from None
    check_fallback(hf_config, tensor_parallel_size, pipeline_parallel_size)
    return TRANSFORMERS_FALLBACK, "transformers"


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture == TRANSFORMERS_FALLBACK:
        from engine.models.transformers_fallback import TransformersForCausalLM

        return TransformersForCausalLM
    module_name, class_name = _MODELS[check_architecture([architecture])]
    return getattr(importlib.import_module(module_name), class_name)
