"""Build the registered model class for a resolved config and fill its weights.

Rule: parameters are created directly on the target device in the target dtype
(uninitialised: the loader writes every one of them), and a parameter left unwritten is an
error, never a silent random weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Union

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.registry import get_model_class

DUMMY_SEED = 0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Loading is copies and casts, bound by memory bandwidth: one thread is as fast as
    many, and measured 6x faster than two on a host whose cores other processes share."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_model(
    model_config: ModelConfig,
    device: Union[torch.device, str],
    dtype: torch.dtype,
) -> nn.Module:
    """The model of `model_config` on `device` in `dtype`, weights loaded, in eval mode."""
    model_cls = get_model_class(model_config.architecture)
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(model_config.hf_config)
    with torch.no_grad(), _single_threaded():
        if model_config.load_format == "dummy":
            from engine.models.loader.weights import fill_dummy

            fill_dummy(model, DUMMY_SEED)
        else:
            loaded = model.load_weights(_weights(model_config))
            _check_all_loaded(model, loaded, model_config)
    return model.eval()


def _weights(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if model_config.load_format == "gguf":
        from engine.models.loader.gguf_model import GGUFFile, gguf_weights

        if model_config.gguf_file is None:
            raise ValueError("load_format 'gguf' needs ModelConfig.gguf_file; pass a .gguf path.")
        return gguf_weights(GGUFFile(model_config.gguf_file), model_config.hf_config)
    if model_config.load_format == "safetensors":
        from engine.models.loader.weights import safetensors_weights

        return safetensors_weights(model_config.model)
    raise ValueError(
        f"load_format {model_config.load_format!r} is not supported; use one of "
        f"safetensors, gguf, dummy (--load-format)."
    )


def _check_all_loaded(model: nn.Module, loaded: set[str], model_config: ModelConfig) -> None:
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise ValueError(
            f"The checkpoint of {model_config.model} lacks weights for {shown}; it does not "
            f"match its config (or pass --load-format dummy for random weights)."
        )
