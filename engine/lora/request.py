"""`LoRARequest` where vLLM users import it from (`from vllm.lora.request import
LoRARequest` -> `from engine.lora.request import LoRARequest`).

Rule: a re-export only; the struct lives with the wire messages (engine.messages.core).
"""

from engine.messages.core import LoRARequest

__all__ = ["LoRARequest"]
