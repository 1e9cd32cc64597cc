"""Multi-LoRA on the worker: peft adapters read and sharded for this rank (`adapter`),
device slots on every linear layer (`slots`), the step's per-token slot ids (`context`),
and the manager that decides what is where (`manager`).

Rule: nothing here runs unless `EngineConfig.lora` is set; a model without a manager has
no LoRA tensors and its layers run exactly as before.
"""

from engine.lora.adapter import LoRAAdapter, LoRATargets, load_adapter, read_adapter_config
from engine.lora.context import LoRAContext
from engine.lora.manager import LoRAManager

__all__ = ["LoRAAdapter", "LoRAContext", "LoRAManager", "LoRATargets", "load_adapter",
           "read_adapter_config"]
