"""Rotary position embedding (neox / HF `rotate_half` layout) with a cos/sin cache.

Rule: the cache and the rotation are computed in float32, then cast back to the model dtype
(the rotation is the `rotary_embedding` op of the current kernel table);
scaling variants only change the inverse frequencies (longrope: per-frequency factors and a
scale on cos/sin, see `cos_sin_cache`). Reads both rope spellings of HF configs: transformers 5
`rope_parameters` and the older `rope_theta` + `rope_scaling`, and the per-layer-type
`rope_parameters` of Gemma 3 ({"sliding_attention": {...}, "full_attention": {...}}).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from platforms.kernels import kernel

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_settings(hf_config: Any, layer_type: Optional[str] = None
                  ) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict with at least 'rope_type') from either config spelling;
    with `layer_type`, that layer type's entry where the config has one per type."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None)) or 10000.0
    rope_type = params.get("rope_type", params.get("type")) or "default"
    params["rope_type"] = rope_type
    return float(theta), params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between (the bands are set by low/high_freq_factor of the original context)."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_ctx = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_inv_freq(head_dim: int, theta: float, factors: list[float]) -> torch.Tensor:
    """LongRoPE (Phi-3): each frequency divided by its own factor (transformers'
    `_compute_longrope_parameters`, same float32 steps)."""
    ext = torch.tensor(factors, dtype=torch.float32)
    if ext.shape != (head_dim // 2,):
        raise ValueError(f"longrope factors have {ext.numel()} entries, the head needs "
                         f"{head_dim // 2} (head_dim / 2); the config's rope_parameters set them.")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (ext * theta**exponents)


def longrope_scaling(params: dict[str, Any], max_position: int) -> tuple[int, float]:
    """(original context, cos/sin scale) of a longrope config, as transformers derives them:
    the scale is `attention_factor`, else sqrt(1 + ln(factor) / ln(original)) with
    factor = max_position_embeddings / original (1.0 when that is <= 1)."""
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or max_position / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return original, float(scale)


def cos_sin_cache(head_dim: int, max_position: int, theta: float,
                  params: dict[str, Any]) -> torch.Tensor:
    """[max_position, head_dim] float32: cos in the first half, sin in the second.

    Longrope (Phi-3) uses one set of factors for every position: the long ones when the
    context (`max_position`, the config's max_position_embeddings) is longer than
    `original_max_position_embeddings`, else the short ones, and scales cos/sin (llama.cpp
    decides the same way, by its context size). transformers picks by the sequence's
    length and, when a sequence grows past the original context, recomputes its whole cache
    with the long factors; a paged cache cannot re-rotate cached keys, so this equals HF
    for sequences longer than the original context (and for every sequence of a model
    without long-context scaling), and differs from it on shorter ones of a long-context
    model."""
    positions = torch.arange(max_position, dtype=torch.float32)
    if params["rope_type"] == "longrope":
        original, scale = longrope_scaling(params, max_position)
        factors = params["long_factor" if max_position > original else "short_factor"]
        freqs = torch.outer(positions, _longrope_inv_freq(head_dim, theta, factors))
        return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
    freqs = torch.outer(positions, inverse_frequencies(head_dim, theta, params))
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def inverse_frequencies(head_dim: int, theta: float, params: dict[str, Any]) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies after the configured scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    raise ValueError(
        f"rope type {rope_type!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}); the model's config.json sets it."
    )


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions, looking cos/sin up in a float32 cache."""

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 params: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        cache = cos_sin_cache(head_dim, max_position, theta, params or {"rope_type": "default"})
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._op = kernel("rotary_embedding")

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D]; k [T, Hkv, D] -> rotated (q, k)."""
        return self._op(positions, q, k, self.cos_sin_cache)
