"""Padded shape buckets: the capture strategy of static-graph platforms (TPU/XLA, Gaudi HPU
graphs), offered with the contract like `platforms.static_attention`.

Rule: pure functions of the configuration. A static-graph compiler builds one program per
input shape, so every step is padded up to a bucket: request count and longest chunk of new
tokens to powers of two (chunks at least `min_query`), blocks per request to a power of two.
The set of buckets is finite and known at startup, so once each has run, no step compiles
again. `BucketGraphRunner` is the graph runner both platforms share: it picks the bucket,
runs the pure-decode buckets at warm-up and hands back the real rows; a platform writes only
how one padded step runs (`run_bucket`).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from platforms.interface import AttentionBackend, DummyBatchFactory, GraphRunner, ModelForward
from platforms.static_attention import StaticAttentionMetadata, StepShape
from platforms.util import cdiv

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

logger = logging.getLogger(__name__)

MIN_QUERY_BUCKET = 16  # default: a prefill chunk pads to at least this many tokens


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2*lo, ... up to the first power >= hi (so hi is always covered)."""
    out, n = [], next_power_of_two(lo)
    while True:
        out.append(n)
        if n >= hi:
            return tuple(out)
        n *= 2


@dataclass(frozen=True)
class BucketLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_blocks_per_req: int  # ceil(max_model_len / block_size)
    min_query: int = MIN_QUERY_BUCKET  # smallest prefill bucket (decodes are 1)

    @classmethod
    def from_config(cls, config: PlatformConfig, min_query: int = MIN_QUERY_BUCKET
                    ) -> BucketLimits:
        return cls(config.max_num_seqs, config.max_num_batched_tokens,
                   config.max_blocks_per_req, min_query)

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return powers_of_two(1, self.max_num_seqs)

    @property
    def query_buckets(self) -> tuple[int, ...]:
        return (1, *powers_of_two(self.min_query, self.max_num_batched_tokens))

    @property
    def block_buckets(self) -> tuple[int, ...]:
        return powers_of_two(1, self.max_blocks_per_req)


def _ceil_to(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} is above the largest bucket {buckets[-1]}.")


def bucket_for(limits: BucketLimits, num_reqs: int, max_query: int, max_blocks: int
               ) -> StepShape:
    """The padded shape a step runs in."""
    return StepShape(
        batch=_ceil_to(limits.batch_buckets, num_reqs, "request count"),
        query=_ceil_to(limits.query_buckets, max_query, "longest chunk"),
        blocks=_ceil_to(limits.block_buckets, max_blocks, "blocks per request"),
    )


def decode_buckets(limits: BucketLimits) -> tuple[StepShape, ...]:
    """Pure-decode shapes, compiled at warm-up (the steady state of serving)."""
    return tuple(StepShape(b, 1, k) for b in limits.batch_buckets for k in limits.block_buckets)


def num_programs(limits: BucketLimits) -> int:
    """Upper bound on distinct compiled programs (every bucket combination)."""
    return len(limits.batch_buckets) * len(limits.query_buckets) * len(limits.block_buckets)


class BucketGraphRunner(GraphRunner, abc.ABC):
    """A graph runner for static-shape platforms: each step runs padded to its bucket.

    The runner finds the step's bucket from its `StaticAttentionMetadata`, calls
    `run_bucket` and returns the real tokens' rows; `capture` runs every pure-decode bucket
    once (compiling or capturing it), the rest compile on first use. `captured_sizes` are
    the decode buckets' token counts.

    Example (a platform that compiles each bucket lazily)::

        class MyRunner(BucketGraphRunner):
            def run_bucket(self, shape, input_ids, positions, metadata):
                ids, pos = pad_to(shape, input_ids, positions)
                return self.forward(ids, pos, metadata.padded(shape))
    """

    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = (), *,
                 limits: BucketLimits | None = None) -> None:
        super().__init__(forward, config, attention)
        self.limits = limits if limits is not None else BucketLimits.from_config(config)
        self.captured_sizes = tuple(sorted({s.num_tokens for s in decode_buckets(self.limits)}))
        self.seen: set[StepShape] = set()  # buckets run at least once

    def capture(self, make_batch: DummyBatchFactory) -> None:
        input_ids, positions, metadata = make_batch(1)
        for shape in decode_buckets(self.limits):
            self.run_bucket(shape, input_ids, positions, metadata)
            self.seen.add(shape)
        logger.info("%s: %d decode buckets ready", type(self).__name__, len(self.seen))

    def bucket(self, metadata: StaticAttentionMetadata) -> StepShape:
        """The bucket a step with this metadata runs in."""
        common = metadata.common
        return bucket_for(self.limits, common.num_reqs, common.max_query_len,
                          cdiv(common.max_seq_len, metadata.block_size))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: StaticAttentionMetadata) -> torch.Tensor:
        shape = self.bucket(attn_metadata)
        hidden = self.run_bucket(shape, input_ids, positions, attn_metadata)
        self.seen.add(shape)
        return hidden[:attn_metadata.common.num_actual_tokens]

    @abc.abstractmethod
    def run_bucket(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
                   metadata: StaticAttentionMetadata) -> torch.Tensor:
        """Run one step padded to `shape` (inputs and metadata are the step's own, with
        `metadata.common.num_actual_tokens` real tokens); return hidden states whose first
        rows are the real tokens'."""
