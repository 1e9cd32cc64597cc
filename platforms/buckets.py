"""Padded shape buckets: the capture strategy of static-graph platforms (TPU/XLA, Gaudi HPU
graphs), offered with the contract like `platforms.static_attention`.

Rule: pure functions of the configuration. A static-graph compiler builds one program per
input shape, so every step is padded up to a bucket: request count and longest chunk of new
tokens to powers of two (chunks at least `min_query`), blocks per request to a power of two.
The set of buckets is finite and known at startup, so once each has run, no step compiles
again.
"""

from __future__ import annotations

from dataclasses import dataclass

from platforms.static_attention import StepShape
from platforms.util import cdiv

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
    def from_config(cls, config, min_query: int = MIN_QUERY_BUCKET) -> BucketLimits:
        sched = config.scheduler
        return cls(sched.max_num_seqs, sched.max_num_batched_tokens,
                   cdiv(sched.max_model_len, config.cache.block_size), min_query)

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
