"""The Spyre graph runner: one compiled graph per step shape, every step padded to one.

Rule: the device runs only graphs compiled at warm-up. Each step is padded to the smallest
compiled `StepShape` that holds it (tokens appended as padding rows, attention metadata laid
out again on the larger grid) and only the real rows come back. A step that fits no compiled
shape is an error, never a new compilation: the scheduler's `StaticBatching` constraint,
built from the same warm-up shapes, never forms one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch

from engine_spyre.shapes import SHAPES_ENV, pick_step_shape
from platforms.interface import AttentionBackend, DummyBatchFactory, GraphRunner, ModelForward
from platforms.static_attention import StaticAttentionMetadata, StepShape
from platforms.util import cdiv

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

logger = logging.getLogger(__name__)


class StaticShapeGraphRunner(GraphRunner):
    """Compiles `forward` with `backend` (None: runs eagerly, still padded to the shapes)."""

    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = (), *,
                 step_shapes: tuple[StepShape, ...], backend: Optional[str]) -> None:
        if backend is not None:
            # dynamic=False: one graph per shape, never a shape-generic one.
            forward = torch.compile(forward, backend=backend, dynamic=False)
        super().__init__(forward, config, attention)
        self.backend = backend
        self.step_shapes = step_shapes
        self.captured_sizes = tuple(sorted({s.num_tokens for s in step_shapes}))
        self.compiled_shapes: set[StepShape] = set()

    def capture(self, make_batch: DummyBatchFactory) -> None:
        """Run (and so compile) every step shape once, on a dummy one-token batch padded."""
        input_ids, positions, metadata = make_batch(1)
        for shape in self.step_shapes:
            self._run(shape, input_ids, positions, metadata)
        logger.info("Spyre: %d step shapes ready (%s), backend %s", len(self.step_shapes),
                    ", ".join(f"{s.batch}x{s.query}/{s.blocks}b" for s in self.step_shapes),
                    self.backend or "none (eager)")

    def shape_for(self, metadata: StaticAttentionMetadata) -> StepShape:
        common = metadata.common
        max_blocks = cdiv(common.max_seq_len, metadata.block_size)
        shape = pick_step_shape(self.step_shapes, common.num_reqs, common.max_query_len,
                                max_blocks, common.num_actual_tokens)
        if shape is None:
            raise RuntimeError(
                f"A step of {common.num_reqs} requests (longest query {common.max_query_len} "
                f"tokens, longest context {common.max_seq_len}) fits none of the compiled "
                f"shapes ({', '.join(map(str, self.step_shapes))}); the platform's scheduling "
                f"constraints should have prevented it. Check {SHAPES_ENV}."
            )
        return shape

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: StaticAttentionMetadata) -> torch.Tensor:
        shape = self.shape_for(attn_metadata)
        return self._run(shape, input_ids, positions, attn_metadata)

    def _run(self, shape: StepShape, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: StaticAttentionMetadata) -> torch.Tensor:
        num_real = metadata.common.num_actual_tokens
        pad = shape.num_tokens - num_real
        ids = torch.nn.functional.pad(input_ids[:num_real], (0, pad))
        pos = torch.nn.functional.pad(positions[:num_real], (0, pad))
        hidden = self.forward(ids, pos, metadata.padded(shape))
        self.compiled_shapes.add(shape)
        return hidden[:num_real]
