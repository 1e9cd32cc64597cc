"""The step's slot ids live in one persistent buffer written in place (a captured graph
replays with the new values), rows past the step's tokens hold -1, and the host flag says
whether any token has an adapter."""

from __future__ import annotations

import numpy as np
import torch

from engine.lora import LoRAContext


def test_slot_ids_are_written_in_place_with_minus_one_padding():
    context = LoRAContext(8, torch.device("cpu"))
    address = context.slot_ids.data_ptr()
    context.set_step(np.array([1, 1, 0, -1, 0]))
    assert context.is_active and context.applies
    assert context.slot_ids.tolist() == [1, 1, 0, -1, 0, -1, -1, -1]
    context.set_step(np.array([-1, -1]))
    assert not context.is_active and not context.applies
    assert context.slot_ids.tolist() == [-1] * 8 and context.slot_ids.data_ptr() == address
    assert context.token_slots(2).data_ptr() == address
    context.always_apply = True  # graphs captured with the ops: they always run
    assert context.applies
