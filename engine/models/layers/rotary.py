"""Rotary position embedding (neox / HF `rotate_half` layout) with a cos/sin cache.

Rule: the cache and the rotation are computed in float32, then cast back to the model dtype
(the rotation is the `rotary_embedding` op of the current kernel table);
scaling variants only change the inverse frequencies. Reads both rope spellings of HF
configs: transformers 5 `rope_parameters` and the older `rope_theta` + `rope_scaling`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from platforms.kernels import kernel

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict with at least 'rope_type') from either config spelling."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
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
        inv_freq = inverse_frequencies(head_dim, theta, params or {"rope_type": "default"})
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, head_dim]: cos in the first half, sin in the second.
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._op = kernel("rotary_embedding")

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D]; k [T, Hkv, D] -> rotated (q, k)."""
        return self._op(positions, q, k, self.cos_sin_cache)
