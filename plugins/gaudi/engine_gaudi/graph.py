"""HPU graphs over padded shape buckets: one captured graph per bucket, replayed on static
input buffers.

Rule: a graph reads and writes only the buffers it was captured with, so every bucket owns
static buffers (input ids, positions, and each tensor of its `StaticAttentionMetadata`); a
step is padded to its bucket (`platforms.buckets`), copied into that bucket's buffers, and the
graph replayed; only the real rows come back. Decode buckets are captured at warm-up, prefill
buckets on first use. How a graph is captured is a `GraphFactory`: HPU graphs on a Gaudi
(habana_frameworks, imported only there), or `EagerReplay`, which re-runs the forward on the
same static buffers (--enforce-eager, and the CPU tests of this runner's own logic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from platforms.buckets import BucketGraphRunner, BucketLimits
from platforms.interface import AttentionBackend, ModelForward
from platforms.static_attention import StaticAttentionMetadata, StepShape

if TYPE_CHECKING:
    from platforms.config import PlatformConfig


# The tensors of StaticAttentionMetadata that `static_paged_attention` reads: copied into the
# bucket's buffers before each replay.
STATIC_FIELDS = ("slot_mapping", "grid_src", "token_cell", "block_table", "mask")


class Replayable(Protocol):
    def replay(self) -> torch.Tensor: ...


GraphFactory = Callable[[Callable[[], torch.Tensor]], Replayable]


class EagerReplay:
    """Runs `fn` again at every replay (no capture): the same buffers, the same padding."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class HpuGraph:
    """`fn` captured once into an HPU graph; `replay` reruns it and returns its output."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        import habana_frameworks.torch as ht

        self._graph = ht.hpu.HPUGraph()
        stream = ht.hpu.Stream()
        with ht.hpu.stream(stream):
            self._graph.capture_begin()
            self._out = fn()
            self._graph.capture_end()

    def replay(self) -> torch.Tensor:
        self._graph.replay()
        return self._out


@dataclasses.dataclass
class _Bucket:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: StaticAttentionMetadata
    graph: Optional[Replayable]  # None only while the bucket is being built


class HpuGraphBucketRunner(BucketGraphRunner):
    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = (), *,
                 limits: Optional[BucketLimits] = None,
                 make_graph: GraphFactory = EagerReplay) -> None:
        super().__init__(forward, config, attention, limits=limits)
        self.make_graph = make_graph
        self.buckets: dict[StepShape, _Bucket] = {}

    def run_bucket(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
                   metadata: StaticAttentionMetadata) -> torch.Tensor:
        bucket = self.buckets.get(shape)
        if bucket is None:  # first step of this bucket: capture with its own inputs
            bucket = self._bucket(shape, input_ids, positions, metadata)
        else:
            self._fill(bucket, shape, input_ids, positions, metadata)
        assert bucket.graph is not None
        return bucket.graph.replay()

    def _bucket(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: StaticAttentionMetadata) -> _Bucket:
        """Static buffers for `shape`, filled with this step, and the graph over them."""
        n = shape.num_tokens
        ids = torch.zeros(n, dtype=input_ids.dtype, device=input_ids.device)
        pos = torch.zeros(n, dtype=positions.dtype, device=positions.device)
        bucket = _Bucket(ids, pos, metadata.padded(shape), graph=None)
        self._fill(bucket, shape, input_ids, positions, metadata)
        static_md = bucket.metadata
        bucket.graph = self.make_graph(lambda: self.forward(ids, pos, static_md))
        self.buckets[shape] = bucket
        return bucket

    @staticmethod
    def _fill(bucket: _Bucket, shape: StepShape, input_ids: torch.Tensor,
              positions: torch.Tensor, metadata: StaticAttentionMetadata) -> None:
        """Copy this step, padded to `shape`, into the bucket's static buffers."""
        num_real = metadata.common.num_actual_tokens
        bucket.input_ids.zero_()[:num_real].copy_(input_ids[:num_real])
        bucket.positions.zero_()[:num_real].copy_(positions[:num_real])
        padded = metadata.padded(shape)
        for name in STATIC_FIELDS:
            getattr(bucket.metadata, name).copy_(getattr(padded, name))
