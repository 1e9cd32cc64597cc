"""One layer's LoRA device slots: every adapter the device holds, stacked, for one linear.

Rule: the tensors are allocated once (at startup, zeroed) at the largest rank and never
reallocated; loading an adapter into slot s overwrites slot s in place (zero past the
adapter's rank, so a smaller rank adds exact zeros). The ops see one layout for every layer:
a merged layer (q/k/v, gate/up) has one slice per projection, a plain one a single slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from engine.lora.context import LoRAContext


class LayerSlots:
    """lora_a [L, S, R, in_features] and lora_b [L, S, max(slice_sizes), R] in the model
    dtype (L slices, S = max_loras slots, R = max_lora_rank; this rank's shard of each), and
    the step's `LoRAContext`. Scaling is folded into lora_b."""

    def __init__(self, in_features: int, slice_sizes: tuple[int, ...], num_slots: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device,
                 context: LoRAContext, shrink: Callable[..., Any],
                 expand: Callable[..., Any]) -> None:
        self.slice_sizes = tuple(slice_sizes)
        num_slices = len(slice_sizes)
        self.lora_a = torch.zeros(num_slices, num_slots, max_rank, in_features, dtype=dtype,
                                  device=device)
        self.lora_b = torch.zeros(num_slices, num_slots, max(slice_sizes), max_rank,
                                  dtype=dtype, device=device)
        self.context = context
        self._shrink, self._expand = shrink, expand

    def write(self, slot: int,
              slices: list[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Slot `slot` := one (A [r, in], B [size, r]) per slice (this rank's shard, scaled),
        or None where the adapter leaves that slice alone (zeros)."""
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()
        for index, weights in enumerate(slices):
            if weights is None:
                continue
            a, b = weights
            rank = a.shape[0]
            self.lora_a[index, slot, :rank].copy_(a)
            self.lora_b[index, slot, : b.shape[0], :rank].copy_(b)

    def clear(self, slot: int) -> None:
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, sum(slice_sizes)] += each token's adapter delta of x [T, in] (in place;
        returns y). Nothing runs when no token of the step has an adapter."""
        if not self.context.applies:
            return y
        slot_ids = self.context.token_slots(x.shape[0])
        buffer = self._shrink(x, self.lora_a, slot_ids)  # [L, T, R] float32
        self._expand(y, buffer, self.lora_b, slot_ids, self.slice_sizes)
        return y
