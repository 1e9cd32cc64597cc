"""KV-cache groups: how the layers of a model share the block pool when their attention
differs (full attention beside sliding windows: Gemma 2/3, gpt-oss, Mistral v0.1).

Rule: layers whose attention keeps the same tokens (the same window, or none) form groups of
equal size, and each group has its own block table per request, drawn from one pool. Equal
sizes make every block id cost the same memory in every group: the cache is `num_slots`
tensors of `num_blocks` blocks, and layer `groups[g].layers[j]` keeps its K/V in tensor j
(its blocks are the ones group g's tables name). A window group holds only the blocks its
window still reaches, so Gemma 3 (five local layers to one global) keeps about a sixth of
the memory a window-less cache would at long contexts.

Why equal-size groups rather than one table for all layers: with one table every block
would hold all layers, and a local layer's blocks could not be given back while the global
layers still need theirs. Why not one group per window with its own pool: a fixed split
between pools is wrong for every workload but one; one pool lends blocks where they are
needed. (The same design as vLLM's hybrid allocator.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class KVCacheGroup:
    sliding_window: Optional[int]  # None: full attention (every earlier token is kept)
    layers: tuple[int, ...]  # model layer indices; layers[j] keeps its K/V in slot tensor j


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[KVCacheGroup, ...]

    @property
    def num_slots(self) -> int:
        """Cache tensors per rank (a block id spans one block of each)."""
        return max(len(g.layers) for g in self.groups)

    @property
    def windows(self) -> tuple[Optional[int], ...]:
        return tuple(g.sliding_window for g in self.groups)

    def place(self, layer: int) -> tuple[int, int]:
        """(group, slot) of a model layer."""
        for g, group in enumerate(self.groups):
            if layer in group.layers:
                return g, group.layers.index(layer)
        raise ValueError(f"Layer {layer} is in no KV-cache group.")


def plan_kv_cache_layout(windows: Sequence[Optional[int]], max_model_len: int) -> KVCacheLayout:
    """Groups for layers with these windows (None: full). A window of at least
    `max_model_len` keeps every token, so it is full attention for the cache."""
    if not windows:
        raise ValueError("A model needs at least one attention layer for a KV cache.")
    kinds: dict[Optional[int], list[int]] = {}
    for layer, window in enumerate(windows):
        kept = None if window is None or window >= max_model_len else window
        kinds.setdefault(kept, []).append(layer)
    size = min(len(layers) for layers in kinds.values())
    groups = []
    for window, layers in kinds.items():
        for start in range(0, len(layers), size):
            groups.append(KVCacheGroup(window, tuple(layers[start:start + size])))
    # Full attention first: its hit length bounds every group's in prefix caching.
    groups.sort(key=lambda g: (g.sliding_window is not None, g.layers[0]))
    return KVCacheLayout(tuple(groups))
