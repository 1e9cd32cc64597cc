"""The XLA graph runner: every step padded to a bucket, so XLA reuses compiled programs.

Rule: the runner pads, runs the lazy forward, and cuts the real rows out; XLA traces and
compiles a program the first time a bucket is seen and replays it after. Warm-up compiles
every pure-decode bucket; prefill buckets compile on first use (a bounded set, see
`buckets.num_programs`).
"""

from __future__ import annotations

import logging

import torch

from platforms.buckets import BucketLimits, bucket_for, decode_buckets
from platforms.interface import DummyBatchFactory, GraphRunner, ModelForward
from platforms.static_attention import StaticAttentionMetadata, StepShape
from platforms.util import cdiv

logger = logging.getLogger(__name__)


def _sync() -> None:
    """Cut the lazy graph here and run it (torch_xla >= 2.5 spells it torch_xla.sync)."""
    import torch_xla

    sync = getattr(torch_xla, "sync", None)
    if sync is not None:
        sync()
    else:  # older releases
        import torch_xla.core.xla_model as xm

        xm.mark_step()


class XlaBucketRunner(GraphRunner):
    def __init__(self, forward: ModelForward, config, limits: BucketLimits,
                 lazy: bool = True) -> None:
        super().__init__(forward, config)
        self.limits = limits
        self.lazy = lazy  # False: run on an eager device (tests of the padding logic)
        self.seen: set[StepShape] = set()
        self.captured_sizes = tuple(sorted({s.num_tokens for s in decode_buckets(limits)}))

    def capture(self, make_batch: DummyBatchFactory) -> None:
        input_ids, positions, metadata = make_batch(1)
        for shape in decode_buckets(self.limits):
            self._run(shape, input_ids, positions, metadata)
        logger.info("XLA: %d decode buckets compiled", len(self.seen))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: StaticAttentionMetadata) -> torch.Tensor:
        common = attn_metadata.common
        shape = bucket_for(self.limits, common.num_reqs, common.max_query_len,
                           cdiv(common.max_seq_len, attn_metadata.block_size))
        return self._run(shape, input_ids, positions, attn_metadata)

    def _run(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: StaticAttentionMetadata) -> torch.Tensor:
        num_real = metadata.common.num_actual_tokens
        pad = shape.num_tokens - num_real
        # XLA's functionalization cannot take inference tensors: the model runner steps under
        # the platform's no_grad (`inference_context`), and a caller that still wraps the
        # runner in inference_mode (a benchmark) gets it lifted for the padded forward.
        with torch.inference_mode(False), torch.no_grad():
            ids = torch.nn.functional.pad(input_ids[:num_real], (0, pad))
            pos = torch.nn.functional.pad(positions[:num_real], (0, pad))
            hidden = self.forward(ids, pos, metadata.padded(shape))
            if self.lazy:
                _sync()
        self.seen.add(shape)
        return hidden[:num_real]
