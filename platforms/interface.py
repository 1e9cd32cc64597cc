"""The vendor contract: what the hardware-agnostic core asks of a platform.

Rule: the core asks capabilities, never identities. Everything device-specific (where
tensors live, how much memory there is, how attention reads the paged KV cache, how a
forward is captured) is answered by a `Platform` subclass that a plugin registers through
the `engine_platforms` hook. Optional features are capability flags with safe defaults.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

if TYPE_CHECKING:
    from engine.config import EngineConfig

# Bumped whenever a method below changes meaning or signature. A plugin states the version
# it was written for in `Platform.api_version`; a mismatch is a clear error at selection.
PLATFORM_API_VERSION = 1


@dataclass(frozen=True)
class AttentionSpec:
    """Shape of one attention layer, as the backend needs it."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int


@dataclass(frozen=True)
class CommonAttentionMetadata:
    """Backend-neutral description of one flattened step.

    The batch is `num_reqs` requests whose new tokens are laid end to end (no padding):
    request i owns tokens `query_start_loc[i]:query_start_loc[i+1]`, which sit at positions
    `num_computed_tokens[i] .. seq_lens[i]-1` of its sequence. Prefill chunks and decodes
    (one new token) mix freely.
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32, host
    seq_lens_cpu: torch.Tensor  # [num_reqs] int32, host: context + new tokens
    num_computed_tokens_cpu: torch.Tensor  # [num_reqs] int32, host: context only
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, device
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, device: cache slot of each token


class AttentionBackend(abc.ABC):
    """Paged attention for one platform: owns the KV-cache layout and the kernel."""

    name: ClassVar[str] = "attention"

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor holding keys and values for `num_blocks`."""

    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Backend-specific metadata for a step, built once and shared by all layers."""
        return common

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # kv_cache_shape(num_blocks)
        metadata: Any,  # what build_metadata returned
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        """Write the new keys/values into their cache slots, then attend causally over each
        request's cached context plus its new tokens."""


class Platform(abc.ABC):
    """One kind of device. Subclasses are registered through the `engine_platforms` hook."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # torch device type, e.g. "cpu"
    priority: ClassVar[int] = 0  # highest available wins
    api_version: ClassVar[int] = PLATFORM_API_VERSION

    # Capability flags (optional features default to off).
    supports_graph_capture: ClassVar[bool] = False
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """Cheap check, no heavy imports: can this platform run here?"""

    # ---- device & memory ----
    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type)

    def device_count(self) -> int:
        return 1

    def set_device(self, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Make `device` current for this process (no-op where there is one device)."""

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free_bytes, total_bytes) of the memory the KV cache is carved from."""

    def synchronize(self) -> None:  # noqa: B027
        """Wait until queued device work is done (no-op for synchronous devices)."""

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """One layer's KV-cache tensor. It must hold finite values (zeros) before first use:
        padded attention reads slots no request has written yet, with zero weight."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        """A random generator on this device, seeded (used by per-request seeded sampling)."""
        gen = torch.Generator(device=self.device_type)
        gen.manual_seed(seed)
        return gen

    # ---- config ----
    def resolve_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype for `dtype="auto"`: the model's, or the closest this platform runs well."""
        return model_dtype if model_dtype in self.supported_dtypes else self.supported_dtypes[0]

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int) -> int:
        """How many bytes the KV cache may take, given the measured free memory."""
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        free, _ = self.memory_info()
        return int(free * config.cache.gpu_memory_utilization) - model_bytes

    def validate(self, config: EngineConfig) -> list[str]:
        """Problems with running `config` here; never changes it."""
        problems = []
        dtype = config.model.dtype
        if dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            problems.append(
                f"dtype {str(dtype).removeprefix('torch.')} is not supported on {self.name} "
                f"(supported: {names}); pass --dtype with one of them."
            )
        return problems

    # ---- factories ----
    @abc.abstractmethod
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """The attention backend for layers of this spec."""

    def compile_model(self, forward: Callable[..., Any], config: EngineConfig) -> Callable[..., Any]:
        """How the model forward is compiled/captured (identity: eager)."""
        return forward

    def describe(self) -> dict[str, Optional[str]]:
        """What `engine plugins` shows about this platform."""
        return {
            "device_type": self.device_type,
            "priority": str(self.priority),
            "graph_capture": str(self.supports_graph_capture),
            "dtypes": ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes),
        }
