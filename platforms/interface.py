"""The vendor contract: what the hardware-agnostic core asks of a platform.

Rule: the core asks capabilities, never identities. Everything device-specific (where
tensors live, how much memory there is, how attention reads the paged KV cache, how a
forward is captured, how ranks talk, which op implementations run) is answered by a
`Platform` subclass that a plugin registers through the `engine_platforms` hook. Optional
features are capability flags with safe defaults.

The concerns, each a small group of methods below:

* discovery: `is_available()` (cheap, import-light), `priority`, `api_version`;
* device and memory: `device`, `device_count`, `set_device`, `memory_info`, `synchronize`,
  `seed_everything`, `make_generator`, `create_event`, `allocate_kv_cache`;
* attention: `attention_backend(spec) -> AttentionBackend` (cache layout, metadata, forward);
* capture: `graph_runner(forward, config) -> GraphRunner` (eager, graphs, XLA, static shapes);
* scheduling: `scheduling_constraints(config)` (optional: the step shapes it can run);
* collectives: `distributed_backend`, `communicator(group) -> Communicator`;
* kernels: `kernel_overrides() -> list[KernelImpl]` (named ops, see `platforms.kernels`);
* config: `resolve_dtype`, `kv_cache_bytes`, `validate(config) -> list[str]` (never mutates).
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

if TYPE_CHECKING:
    import torch.distributed

    from engine.config import EngineConfig
    from platforms.kernels import KernelImpl
    from platforms.scheduling import StaticBatching

# Bumped whenever a method below changes meaning or signature. A plugin states the version
# it was written for in `Platform.api_version`; a mismatch is a clear error at selection.
PLATFORM_API_VERSION = 2
# Version history:
#   1  first cut: device/memory, attention backend, compile_model.
#   2  graph_runner replaces compile_model; communicator, kernel_overrides, create_event,
#      supported_head_sizes and distributed_backend added.
#   Optional additions within 2 (defaults keep older plugins working): scheduling_constraints
#   (static-shape platforms), measures_peak_memory/reset_peak_memory/peak_memory_bytes,
#   inference_context (the no-grad mode a step runs under; XLA needs no_grad),
#   executes_asynchronously (async scheduling by default) with DeviceEvent.query,
#   default_max_num_seqs, DeviceModulePlatform (a base for torch-style device modules),
#   Communicator.all_reduce_add_rms_norm (all-reduce fused with residual add and RMSNorm),
#   and ray_device_resource (what a rank reserves on Ray; before, the Ray executor compared
#   device_type with "cpu", which gave a Spyre rank a CPU instead of its card).


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


ModelForward = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# Builds a throw-away batch of `num_tokens` decode tokens (input_ids, positions, metadata
# from the platform's own backend) for a graph runner to capture with.
DummyBatchFactory = Callable[[int], tuple[torch.Tensor, torch.Tensor, Any]]


class GraphRunner:
    """How the model forward runs each step: eagerly (this base), or compiled/captured.

    The model runner calls `capture(make_batch)` once at warm-up, then the runner itself for
    every step with the step's real (unpadded) inputs. A capturing runner pads to the
    nearest captured size on its own and returns rows for the real tokens only, so padding
    never leaks into the core.

    Example (a runner that compiles once and runs every size)::

        class CompiledRunner(GraphRunner):
            def __init__(self, forward, config):
                super().__init__(torch.compile(forward, dynamic=True), config)
    """

    def __init__(self, forward: ModelForward, config: EngineConfig) -> None:
        self.forward = forward
        self.config = config
        self.captured_sizes: tuple[int, ...] = ()

    def capture(self, make_batch: DummyBatchFactory) -> None:  # noqa: B027 (optional)
        """Compile or capture whatever the runner replays later (eager: nothing)."""

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any
    ) -> torch.Tensor:  # [num_tokens, hidden]
        return self.forward(input_ids, positions, attn_metadata)


class Communicator(abc.ABC):
    """Collectives among the ranks of one process group, on this platform's device.

    Every method is called by all ranks of the group with tensors of the same shape and
    dtype (except `send`/`recv`, which pair two ranks). Results are new tensors unless said.

    Example::

        comm = platform.communicator(group)
        y = comm.all_reduce(x)          # sum over ranks
    """

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks."""

    @abc.abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order."""

    @abc.abstractmethod
    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then this rank's equal slice of it along `dim`."""

    @abc.abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`src`'s tensor on every rank (in place into `x`; `x` returned)."""

    @abc.abstractmethod
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send to group rank `dst` (blocks until matched)."""

    @abc.abstractmethod
    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Receive from group rank `src` into `x` (shape and dtype agreed); `x` returned."""

    @abc.abstractmethod
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Split `x` into world_size equal chunks along dim 0; chunk j goes to rank j, and
        the result is the chunks received, concatenated in rank order."""

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_rms_norm(all_reduce(x), residual, weight, eps)`: the sum over ranks of a
        row-parallel layer's partial output `x` [T, H], plus `residual`, normalised; returns
        (normed, summed) as the kernel table's ``fused_add_rms_norm`` does, and
        `add_rms_norm` is that op. Optional: a platform may do it all in one kernel (the
        all-reduce output never written out), with the same numbers as this default: the
        sum rounded to x's dtype, then the residual added.

        Example::

            normed, residual = comm.all_reduce_add_rms_norm(partial, residual, w, 1e-6,
                                                            kernel("fused_add_rms_norm"))
        """
        return add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def barrier(self) -> None:  # noqa: B027
        """Wait for every rank."""

    def destroy(self) -> None:  # noqa: B027
        """Release resources (the group itself belongs to whoever created it)."""


class TorchDistributedCommunicator(Communicator):
    """A communicator over a `torch.distributed` group (gloo, nccl, or any backend torch
    knows): enough for most platforms, which then only name their backend."""

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        self._dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} ({x.shape[dim]}) divisible by the group size "
                f"{self.world_size}."
            )
        # Sum everywhere, keep this rank's slice: correct on every backend, gloo included
        # (which has no reduce_scatter); platforms with a native one override this.
        total = self.all_reduce(x)
        return total.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(x, src=self._global[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        self._dist.send(x.contiguous(), dst=self._global[dst], group=self.group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self._dist.recv(x, src=self._global[src], group=self.group)
        return x

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.world_size:
            raise ValueError(
                f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size "
                f"{self.world_size}."
            )
        chunks = [c.contiguous() for c in x.chunk(self.world_size, dim=0)]
        try:
            out = [torch.empty_like(c) for c in chunks]
            self._dist.all_to_all(out, chunks, group=self.group)
        except RuntimeError:
            # gloo has no all_to_all: every rank broadcasts its chunks in turn.
            out = []
            for j in range(self.world_size):
                mine = self.all_gather(chunks[j].unsqueeze(0), dim=0)  # chunk j of every rank
                if j == self.rank:
                    out = list(mine.unbind(0))
        return torch.cat(out, dim=0)

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


class DeviceEvent:
    """A point in a device's work queue: record it, wait for it, time between two.

    This base is for synchronous devices (the host clock); queued devices return their own
    events from `Platform.create_event`.
    """

    def __init__(self) -> None:
        self._t: Optional[float] = None

    def record(self) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:  # noqa: B027 (synchronous: nothing to wait for)
        """Wait until the device passed this event."""

    def query(self) -> bool:
        """Whether the device has passed this event (never waits)."""
        return True

    def elapsed_ms(self, end: DeviceEvent) -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_ms needs both events recorded.")
        return (end._t - self._t) * 1000.0


class QueuedDeviceEvent(DeviceEvent):
    """A DeviceEvent over a torch device module's own event class (`torch.cuda.Event`,
    `torch.npu.Event`, ...), recorded on the current stream with timing on: queued devices
    return one from `create_event` instead of writing their own wrapper.

    Example::

        def create_event(self):
            return QueuedDeviceEvent(torch.cuda.Event)
    """

    def __init__(self, event_class: Callable[..., Any]) -> None:
        super().__init__()
        self._event = event_class(enable_timing=True)

    def record(self) -> None:
        self._event.record()

    def synchronize(self) -> None:
        self._event.synchronize()

    def query(self) -> bool:
        return bool(self._event.query())

    def elapsed_ms(self, end: DeviceEvent) -> float:
        if not isinstance(end, QueuedDeviceEvent):
            raise TypeError(f"elapsed_ms needs another QueuedDeviceEvent, got {type(end).__name__}.")
        return float(self._event.elapsed_time(end._event))


class Platform(abc.ABC):
    """One kind of device. Subclasses are registered through the `engine_platforms` hook."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # torch device type, e.g. "cpu"
    priority: ClassVar[int] = 0  # highest available wins
    api_version: ClassVar[int] = PLATFORM_API_VERSION

    # Capability flags (optional features default to off).
    supports_graph_capture: ClassVar[bool] = False
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    supported_head_sizes: ClassVar[Optional[tuple[int, ...]]] = None  # None: any
    distributed_backend: ClassVar[str] = "gloo"  # torch.distributed backend for its groups
    # Host memory can be page-locked (`pin_memory=True`) for asynchronous uploads to the device.
    supports_pinned_memory: ClassVar[bool] = False
    # Work is queued: launches return before the device finishes, and `create_event` gives
    # events that wait for it. The engine core then schedules step N+1 while step N runs
    # (async scheduling, unless --no-async-scheduling), hiding its host work.
    executes_asynchronously: ClassVar[bool] = False
    # Requests per step when the user sets no --max-num-seqs: a device that decodes a big
    # batch at the cost of a small one wants more (throughput: decodes ride along with
    # prefill chunks instead of waiting in waves).
    default_max_num_seqs: ClassVar[int] = 256
    # True when `peak_memory_bytes` measures something: the model runner then runs one
    # full-size profiling step before sizing the KV cache (see `kv_cache_bytes`).
    measures_peak_memory: ClassVar[bool] = False
    # The Ray resource one rank of this platform reserves ("GPU", "TPU", a custom name the
    # cluster registers); None: the device is the host, a rank reserves one CPU.
    ray_device_resource: ClassVar[Optional[str]] = None

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

    def reset_peak_memory(self) -> None:  # noqa: B027 (optional hook)
        """Start a new peak-memory measurement (see `peak_memory_bytes`).

        The model runner calls it right before its profiling step when
        `measures_peak_memory` is True. Example (CUDA)::

            def reset_peak_memory(self):
                torch.cuda.reset_peak_memory_stats()
        """

    def peak_memory_bytes(self) -> int:
        """Most device memory this process held since `reset_peak_memory` (weights,
        activations, allocator caches, runtime overheads); 0 where nothing is measured.

        Example (CUDA)::

            def peak_memory_bytes(self):
                return torch.cuda.max_memory_reserved()
        """
        return 0

    def inference_context(self) -> contextlib.AbstractContextManager[Any]:
        """The no-grad mode the model runner runs each step (and capture) under.

        Default `torch.inference_mode()`, the cheapest. A platform whose tensors cannot be
        inference tensors returns `torch.no_grad()`. Example (torch_xla, whose
        functionalization rejects inference tensors)::

            def inference_context(self):
                return torch.no_grad()
        """
        return torch.inference_mode()

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """One layer's KV-cache tensor. It must hold finite values (zeros) before first use:
        padded attention reads slots no request has written yet, with zero weight."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)

    def create_event(self) -> DeviceEvent:
        """An event in this device's current work queue (timing, cross-stream waits)."""
        return DeviceEvent()

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
        """How many bytes the KV cache may take, given the measured free memory.

        Called after the model is loaded and, where `measures_peak_memory`, right after the
        profiling step, so `peak_memory_bytes()` holds the peak of a full-size step."""
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
        head_size = config.model.head_dim
        if self.supported_head_sizes is not None and head_size not in self.supported_head_sizes:
            sizes = ", ".join(map(str, self.supported_head_sizes))
            problems.append(
                f"head size {head_size} is not supported by {self.name}'s attention "
                f"(supported: {sizes}); run the model on another platform with --device."
            )
        return problems

    # ---- factories ----
    @abc.abstractmethod
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """The attention backend for layers of this spec."""

    def graph_runner(self, forward: ModelForward, config: EngineConfig) -> GraphRunner:
        """How the model forward is compiled/captured and replayed (base: eager)."""
        return GraphRunner(forward, config)

    def scheduling_constraints(self, config: EngineConfig) -> Optional[StaticBatching]:
        """Which steps this platform can run, for the scheduler (optional; None: any step).

        A platform that runs only shapes it compiled at warm-up returns them, and the
        scheduler then forms only steps that fit one (see `platforms.scheduling`); its graph
        runner pads each step to a captured shape. Example::

            def scheduling_constraints(self, config):
                return StaticBatching((StaticShape(batch_size=4, prompt_len=64,
                                                   new_tokens=20),),
                                      how_to_change="set MY_WARMUP_SHAPES")
        """
        return None

    def communicator(self, group: torch.distributed.ProcessGroup) -> Communicator:
        """Collectives over `group`, a torch.distributed group created with
        `distributed_backend`."""
        return TorchDistributedCommunicator(group)

    def kernel_overrides(self) -> list[KernelImpl]:
        """Named op implementations this platform prefers (see `platforms.kernels`)."""
        return []

    def describe(self) -> dict[str, Optional[str]]:
        """What `engine plugins` shows about this platform."""
        return {
            "device_type": self.device_type,
            "priority": str(self.priority),
            "graph_capture": str(self.supports_graph_capture),
            "dtypes": ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes),
            "head_sizes": (", ".join(map(str, self.supported_head_sizes))
                           if self.supported_head_sizes else "any"),
            "collectives": self.distributed_backend,
            "kernels": ", ".join(sorted({k.name for k in self.kernel_overrides()})) or "reference",
        }


class DeviceModulePlatform(Platform):
    """A platform driven through a torch-style device module (`torch.cuda`, `torch.npu`,
    `habana_frameworks.torch.hpu`, ...): device count and selection, free/total memory,
    synchronize, peak-memory statistics and events all come from `device_module()`, so a
    vendor writes those once here instead of once per plugin. Override what a module lacks.

    Example::

        class MyPlatform(DeviceModulePlatform):
            name, device_type = "my", "mydev"

            def device_module(self):
                import my_torch_ext  # noqa: F401  (adds torch.mydev)
                return torch.mydev
    """

    @abc.abstractmethod
    def device_module(self) -> Any:
        """The module; imported on first use, never at discovery."""

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type, local_rank)

    def device_count(self) -> int:
        return int(self.device_module().device_count())

    def set_device(self, device: torch.device) -> None:
        self.device_module().set_device(device)

    def memory_info(self) -> tuple[int, int]:
        free, total = self.device_module().mem_get_info()
        return int(free), int(total)

    def synchronize(self) -> None:
        self.device_module().synchronize()

    def reset_peak_memory(self) -> None:
        self.device_module().reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        return int(self.device_module().max_memory_reserved())

    def create_event(self) -> DeviceEvent:
        return QueuedDeviceEvent(self.device_module().Event)
