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
import logging
from collections.abc import Callable
from typing import Optional, Protocol

import torch

from platforms.buckets import BucketLimits, bucket_for, decode_buckets
from platforms.interface import DummyBatchFactory, GraphRunner, ModelForward
from platforms.static_attention import StaticAttentionMetadata, StepShape
from platforms.util import cdiv

logger = logging.getLogger(__name__)

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


class HpuGraphBucketRunner(GraphRunner):
    def __init__(self, forward: ModelForward, config, limits: BucketLimits,
                 make_graph: GraphFactory) -> None:
        super().__init__(forward, config)
        self.limits = limits
        self.make_graph = make_graph
        self.buckets: dict[StepShape, _Bucket] = {}
        self.captured_sizes = tuple(sorted({s.num_tokens for s in decode_buckets(limits)}))

    def capture(self, make_batch: DummyBatchFactory) -> None:
        input_ids, positions, metadata = make_batch(1)
        for shape in decode_buckets(self.limits):
            self._bucket(shape, input_ids, positions, metadata)
        logger.info("HPU graphs: %d decode buckets captured", len(self.buckets))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: StaticAttentionMetadata) -> torch.Tensor:
        common = attn_metadata.common
        shape = bucket_for(self.limits, common.num_reqs, common.max_query_len,
                           cdiv(common.max_seq_len, attn_metadata.block_size))
        num_real = common.num_actual_tokens
        bucket = self.buckets.get(shape)
        if bucket is None:  # first step of this bucket: capture with its own inputs
            bucket = self._bucket(shape, input_ids, positions, attn_metadata)
        else:
            self._fill(bucket, shape, input_ids, positions, attn_metadata)
        assert bucket.graph is not None
        return bucket.graph.replay()[:num_real]

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
