"""The model runner of one pipeline stage.

Rule: every stage gets the same scheduler outputs in the same order and keeps the same
request state; a stage after the first receives (hidden, residual) from the previous stage
instead of embedding, a stage before the last sends its output on and samples nothing. Only
the last stage samples; the tokens it sampled reach every stage with the scheduler's next
output for that request (`CachedRequestData.new_token_ids`), so every stage's next decode
input is the token the last stage chose.

Stages run eagerly (the platform's graph runner is not used with pipeline parallelism yet).
Each stage keeps the (start, end) monotonic times of its last forwards (`timeline`), so a
test can see stages working on different batches at the same time.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Optional

import torch

from engine.distributed.pipeline import Stage, recv_activations, send_activations
from engine.messages.step import ModelRunnerOutput, SchedulerOutput
from engine.worker.model_runner import ModelRunner, StepHandle
from platforms.interface import GraphRunner


class PipelineStageRunner(ModelRunner):
    def load_model(self) -> None:
        super().load_model()
        self.stage = Stage.of(self.parallel, self.config.model.hf_config.num_hidden_layers)
        self.forward = GraphRunner(self._stage_forward, self.config.for_platform())  # eager
        self.timeline: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)

    @property
    def bytes_per_block(self) -> int:
        """One block's KV bytes over this stage's layers only (the others are elsewhere)."""
        per_slot = super().bytes_per_block // self.layout.num_slots
        return per_slot * len(set(self._slot_of.values()))

    def _stage_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       attn_metadata: Any) -> Optional[torch.Tensor]:
        """Receive, run this stage's layers, send on; hidden states on the last stage."""
        assert self.model is not None
        start = time.monotonic()
        intermediate = None
        if not self.stage.is_first:
            intermediate = recv_activations(
                self.parallel, input_ids.shape[0], self.config.model.hf_config.hidden_size,
                self.dtype, self.device)
        out = self.model(input_ids, positions, attn_metadata, intermediate)
        if not self.stage.is_last:
            send_activations(self.parallel, *out)
        # Start: before waiting for the previous stage; end: once the output is handed on.
        self.timeline.append((start, time.monotonic()))
        return out if self.stage.is_last else None

    def _dispatch(self, out: SchedulerOutput) -> StepHandle:
        if self.stage.is_last:
            return super()._dispatch(out)
        self.input_batch.update(out)
        if out.total_num_scheduled_tokens == 0:
            return StepHandle.done(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        inputs = self.input_batch.prepare(out)
        self.forward(inputs.input_ids, inputs.positions, self._attn_metadata(inputs))
        return StepHandle.done(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
