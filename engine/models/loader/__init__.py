"""Model loading: `resolve_model_config` (EngineArgs -> EngineConfig) and `load_model`
(config -> nn.Module with weights from safetensors, GGUF or dummy)."""

from engine.models.loader.model_loader import load_model
from engine.models.loader.resolve import checkpoint_dtype, resolve_model_config

__all__ = ["checkpoint_dtype", "load_model", "resolve_model_config"]
