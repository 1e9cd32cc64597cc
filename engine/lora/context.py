"""The per-step LoRA input: which device slot each token's adapter is in.

Rule: this is a step input like the attention metadata, not a hidden global. The runner
owns the one `LoRAContext` (through its `LoRAManager`), every LoRA-capable layer is handed a
reference to it when the manager binds its slots at load, and the runner writes it once per
step before the forward. Nothing else reads or writes it, and a model built without LoRA
never sees one.

`slot_ids` is a persistent device buffer written in place, never replaced: a captured graph
(CUDA graphs, HIP graphs) records its address as an input and replays with the values of the
current step. Rows past the step's tokens hold -1 (no adapter), so a runner that pads the
batch to a captured size adds nothing for the padding rows.
"""

from __future__ import annotations

import numpy as np
import torch


class LoRAContext:
    """`slot_ids[:num_tokens]` int32: each token's adapter slot this step, -1 for the base
    model. `is_active`: whether any token of the step has an adapter (a host flag, so a step
    of base-model requests skips the LoRA ops without looking at the device)."""

    def __init__(self, max_num_tokens: int, device: torch.device) -> None:
        self.device = device
        self.slot_ids = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.is_active = False
        # Set while graphs are captured and afterwards where they were: a replayed graph
        # holds the LoRA ops or not, whatever the host flag says at replay, so they are
        # always recorded (slot -1 rows add nothing).
        self.always_apply = False

    @property
    def applies(self) -> bool:
        """Whether layers run their LoRA ops this step."""
        return self.is_active or self.always_apply

    def set_step(self, slot_ids_cpu: np.ndarray) -> None:
        """Write the step's per-token slots ([num_tokens] int, -1: base model) in place."""
        num_tokens = len(slot_ids_cpu)
        if num_tokens > len(self.slot_ids):
            # A step larger than max_num_batched_tokens (never scheduled; a caller running
            # the model by hand): grow. Graphs captured before keep the old buffer, but no
            # captured size is larger than the buffer they were captured with.
            self.slot_ids = torch.full((num_tokens,), -1, dtype=torch.int32,
                                       device=self.device)
        self.is_active = bool((slot_ids_cpu >= 0).any())
        self.slot_ids.fill_(-1)
        if num_tokens:
            host = torch.from_numpy(np.ascontiguousarray(slot_ids_cpu, dtype=np.int32))
            self.slot_ids[:num_tokens].copy_(host)

    def token_slots(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] int32 view of the buffer (what a layer passes to the ops)."""
        return self.slot_ids[:num_tokens]
