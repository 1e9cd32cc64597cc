"""Which adapters are on the device, which in host memory, and each step's per-token slots.

Rule: the device holds `max_loras` slots per LoRA-capable layer, allocated once at startup;
host memory keeps up to `max_cpu_loras` adapters already read (LRU), so an adapter evicted
from the device comes back without reading its directory again. An adapter takes a free
slot, or the least recently used slot that no request of the current step uses; the
scheduler never puts more than `max_loras` distinct adapters in one step, and a step that
has more is refused (ValueError) rather than run with one of them evicted mid-step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import nn

from engine.config import LoRAConfig
from engine.lora.adapter import LoRAAdapter, LoRATargets, load_adapter
from engine.lora.context import LoRAContext
from engine.lora.slots import LayerSlots
from engine.messages.core import LoRARequest
from platforms.kernels import kernel


class LoRAManager:
    """Binds `LayerSlots` to every LoRA-capable layer of `model` (call inside the runner's
    `use_kernels`, where the ops are looked up) and owns the step's `LoRAContext`."""

    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device,
                 dtype: torch.dtype, max_num_tokens: int) -> None:
        if config.max_loras < 1:
            raise ValueError(f"max_loras is {config.max_loras}; it must be at least 1 "
                             "(--max-loras).")
        self.max_cpu_loras = config.max_loras if config.max_cpu_loras is None \
            else config.max_cpu_loras
        if self.max_cpu_loras < config.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} is below max_loras="
                             f"{config.max_loras}: every adapter on the device is also kept "
                             "in host memory; raise --max-cpu-loras.")
        self.config = config
        self.dtype = dtype
        self.targets = LoRATargets(model)
        self.context = LoRAContext(max_num_tokens, device)
        shrink, expand = kernel("lora_shrink"), kernel("lora_expand")
        self.slots: dict[str, LayerSlots] = {}
        for name, layer in self.targets.layers.items():
            slots = LayerSlots(layer.in_features, layer.lora_slice_sizes, config.max_loras,
                               config.max_lora_rank, dtype, device, self.context,
                               shrink, expand)
            layer.lora = slots
            self.slots[name] = slots
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # id -> adapter, LRU first
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # id -> device slot, LRU first
        self._step_ids: set[int] = set()  # adapters the current step uses

    @property
    def device_ids(self) -> list[int]:
        """Adapter ids on the device, least recently used first."""
        return list(self._slot_of)

    @property
    def host_ids(self) -> list[int]:
        return list(self._host)

    def begin_step(self) -> None:
        """A new step: no slot is held by it yet."""
        self._step_ids = set()

    def slot_of(self, request: LoRARequest) -> int:
        """The device slot holding `request`'s adapter, loaded there if it is not (reading
        its directory unless it is in host memory). ValueError: the adapter cannot be read
        for this model, or every slot is taken by other adapters of this step."""
        lora_id = request.lora_int_id
        slot = self._slot_of.get(lora_id)
        if slot is None:
            adapter = self._host_adapter(request)
            slot = self._free_slot(lora_id)
            self._write(slot, adapter)
            self._slot_of[lora_id] = slot
        self._slot_of.move_to_end(lora_id)
        self._step_ids.add(lora_id)
        return slot

    def set_step(self, requests: Sequence[Optional[LoRARequest]],
                 num_tokens: np.ndarray) -> None:
        """The step's per-token slots into the context: request i (None: the base model)
        runs `num_tokens[i]` tokens, in order."""
        self.begin_step()
        slots = np.fromiter((-1 if r is None else self.slot_of(r) for r in requests),
                            np.int32, len(requests))
        self.context.set_step(np.repeat(slots, num_tokens))

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter (device slot and host copy); whether it was known."""
        known = self._host.pop(lora_int_id, None) is not None
        slot = self._slot_of.pop(lora_int_id, None)
        if slot is not None:
            for layer_slots in self.slots.values():
                layer_slots.clear(slot)
        return known or slot is not None

    def _host_adapter(self, request: LoRARequest) -> LoRAAdapter:
        adapter = self._host.get(request.lora_int_id)
        if adapter is None:
            adapter = load_adapter(request, self.targets, self.config.max_lora_rank,
                                   self.dtype)
            self._host[request.lora_int_id] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self._host.move_to_end(request.lora_int_id)
        return adapter

    def _free_slot(self, lora_id: int) -> int:
        """A slot no adapter holds, else the least recently used one this step does not."""
        taken = set(self._slot_of.values())
        for slot in range(self.config.max_loras):
            if slot not in taken:
                return slot
        for victim, slot in self._slot_of.items():
            if victim not in self._step_ids:
                del self._slot_of[victim]
                return slot
        raise ValueError(
            f"A step needs more than max_loras={self.config.max_loras} distinct LoRA "
            f"adapters (adapter {lora_id} and {sorted(self._step_ids)}); the scheduler keeps "
            "a step within --max-loras.")

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer_slots in self.slots.items():
            weights = adapter.weights.get(name)
            if weights is None:
                layer_slots.clear(slot)
            else:
                layer_slots.write(slot, weights)
