"""The XLA graph runner: every step padded to a bucket, so XLA reuses compiled programs.

Rule: the runner pads, runs the lazy forward, and cuts the real rows out; XLA traces and
compiles a program the first time a bucket is seen and replays it after. Warm-up compiles
every pure-decode bucket; prefill buckets compile on first use (a bounded set, see
`buckets.num_programs`).
"""

from __future__ import annotations

import torch

from platforms.buckets import BucketGraphRunner
from platforms.static_attention import StaticAttentionMetadata, StepShape


def _sync() -> None:
    """Cut the lazy graph here and run it (torch_xla >= 2.5 spells it torch_xla.sync)."""
    import torch_xla

    sync = getattr(torch_xla, "sync", None)
    if sync is not None:
        sync()
    else:  # older releases
        import torch_xla.core.xla_model as xm

        xm.mark_step()


class XlaBucketRunner(BucketGraphRunner):
    """`lazy=False` runs on an eager device (the CPU tests of the padding logic)."""

    lazy = True

    def run_bucket(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
                   metadata: StaticAttentionMetadata) -> torch.Tensor:
        num_real = metadata.common.num_actual_tokens
        pad = shape.num_tokens - num_real
        # XLA's functionalization cannot take inference tensors: the model runner steps under
        # no_grad (`Capabilities.inference_mode` is False), and a caller that still wraps the
        # runner in inference_mode (a benchmark) gets it lifted for the padded forward.
        with torch.inference_mode(False), torch.no_grad():
            ids = torch.nn.functional.pad(input_ids[:num_real], (0, pad))
            pos = torch.nn.functional.pad(positions[:num_real], (0, pad))
            hidden = self.forward(ids, pos, metadata.padded(shape))
            if self.lazy:
                _sync()
        return hidden
