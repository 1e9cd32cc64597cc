"""The vendor contract: what the hardware-agnostic core asks of a platform.

Rule: the core asks capabilities, never identities. Everything device-specific (where
tensors live, how much memory there is, how attention reads the paged KV cache, how a
forward is captured, how ranks talk, which op implementations run) is answered by a
`Platform` subclass that a plugin registers through the `engine_platforms` hook. What a
platform can do is data (`Capabilities`); what it does is a method. This module holds the
contract only: helpers a platform may build on live beside it (`platforms.device_module`,
`platforms.communicator`, `platforms.events`, `platforms.buckets`,
`platforms.static_attention`), and what the engine tells a platform is
`platforms.config.PlatformConfig`.

The concerns, each a small group of `Platform` members below:

* discovery: `name`, `device_type`, `priority`, `api_version`, `is_available()`;
* what it can do: `capabilities` (dtypes, head sizes, capture, collectives backend, ...);
* device and memory: `device`, `device_count`, `set_device`, `memory_info`, `synchronize`,
  `reset_peak_memory`, `peak_memory_bytes`, `allocate_kv_cache`, `seed_everything`,
  `make_generator`, `create_event`;
* attention: `attention_backend(spec) -> AttentionBackend` (cache layout, metadata, forward);
* capture: `graph_runner(forward, config, attention) -> GraphRunner` (eager, graphs, XLA);
* scheduling: `scheduling_constraints(config)` (optional: the step shapes it can run);
* collectives: `communicator(group) -> Communicator`;
* kernels: `kernel_overrides() -> list[KernelImpl]` (named ops, see `platforms.kernels`);
* config: `resolve_dtype`, `validate(config) -> list[str]` (never mutates), `describe()`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

if TYPE_CHECKING:
    import torch.distributed

    from platforms.config import PlatformConfig
    from platforms.kernels import KernelImpl
    from platforms.scheduling import StaticBatching

# Bumped whenever a member below changes meaning or signature. A plugin states the version
# it was written for in `Platform.api_version`; a mismatch is a clear error at selection.
PLATFORM_API_VERSION = 3
# Version history:
#   1  first cut: device/memory, attention backend, compile_model.
#   2  graph_runner replaces compile_model; communicator, kernel_overrides, create_event,
#      supported_head_sizes and distributed_backend added. Optional additions within 2:
#      scheduling_constraints, measures_peak_memory/reset_peak_memory/peak_memory_bytes,
#      inference_context, executes_asynchronously with DeviceEvent.query,
#      default_max_num_seqs, DeviceModulePlatform, Communicator.all_reduce_add_rms_norm,
#      ray_device_resource.
#   3  * Methods that took the engine's whole EngineConfig (graph_runner, validate,
#        scheduling_constraints, GraphRunner itself) take a `platforms.config.PlatformConfig`,
#        the few settings a platform reads, so no plugin imports the engine.
#      * graph_runner(forward, config, attention) is handed the attention backends every
#        attention call of `forward` goes through (built by `attention_backend`), so a
#        runner can cut its capture at attention without patching the model.
#      * The capability flags (supports_graph_capture, supported_dtypes,
#        supported_head_sizes, distributed_backend, supports_pinned_memory,
#        executes_asynchronously, default_max_num_seqs, measures_peak_memory,
#        ray_device_resource) and inference_context became fields of one `Capabilities`
#        record (`capabilities`); kv_cache_bytes left the contract (the core's memory policy
#        over memory_info and peak_memory_bytes).
#      * TorchDistributedCommunicator, QueuedDeviceEvent and DeviceModulePlatform moved out
#        of this module into platforms.communicator, .events and .device_module.
#      Optional additions within 3 (a platform that names none of them keeps working, and
#      the engine refuses a model that needs one, naming it):
#      * AttentionSpec.sliding_window and .logits_soft_cap, implemented by a platform's
#        backends when `Capabilities.attention_features` lists "sliding_window" /
#        "logits_soft_cap";
#      * KV-cache groups: the layers of a model whose specs differ (Gemma's local and global
#        layers) fall into groups, one backend per group, and the forward then receives a
#        `GroupedAttentionMetadata` (one entry per group); a platform whose graph runner
#        passes it through lists "kv_cache_groups".


# What an AttentionSpec may ask beyond plain causal attention, and what a platform's graph
# runner may be handed (see Capabilities.attention_features).
ATTENTION_FEATURES = ("sliding_window", "logits_soft_cap", "kv_cache_groups")


@dataclass(frozen=True)
class AttentionSpec:
    """Shape of one attention layer, as the backend needs it.

    `sliding_window` W: a query at position p attends keys at positions p - W + 1 .. p (W
    keys, itself included; HF's convention); None: every earlier key. With a window, the
    block-table entries of blocks that lie wholly before the first key any query of the step
    attends may be stale (the engine freed them and gave them to other requests): a backend
    must not read them, not even to mask them out.

    `logits_soft_cap` c: the scores become c * tanh(s / c), s = scale * q.k, before the
    softmax (Gemma 2); None: none.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    block_size: int
    sliding_window: Optional[int] = None
    logits_soft_cap: Optional[float] = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}.")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {self.logits_soft_cap}.")

    @property
    def features(self) -> frozenset[str]:
        """The ATTENTION_FEATURES this spec needs of a backend."""
        return attention_features(self.sliding_window, self.logits_soft_cap)


def attention_features(sliding_window: Optional[int], logits_soft_cap: Optional[float]
                       ) -> frozenset[str]:
    """The ATTENTION_FEATURES an attention layer with these settings needs."""
    needs = set()
    if sliding_window is not None:
        needs.add("sliding_window")
    if logits_soft_cap is not None:
        needs.add("logits_soft_cap")
    return frozenset(needs)


class GroupedAttentionMetadata(tuple):
    """Step metadata of a model whose attention layers fall into several KV-cache groups:
    entry g is `attention[g].build_metadata(...)` over group g's block tables, and a layer of
    group g reads entry g. A model with one group gets its backend's metadata bare."""

    __slots__ = ()


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

    `attention` holds the platform's own attention backends (from `attention_backend`):
    every attention call `forward` makes goes through one of them, so a runner that must
    treat attention apart (capture the stretches between attention calls, run attention
    eagerly) does it through objects its platform built, never by touching the model.

    Example (a runner that compiles once and runs every size)::

        class CompiledRunner(GraphRunner):
            def __init__(self, forward, config, attention=()):
                super().__init__(torch.compile(forward, dynamic=True), config, attention)
    """

    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = ()) -> None:
        self.forward = forward
        self.config = config
        self.attention = tuple(attention)
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


@dataclass(frozen=True)
class Capabilities:
    """What a platform can do, as data: the core reads it and `engine plugins` shows it.

    A platform sets `capabilities = Capabilities(...)` on its class; every field has the
    default of a plain synchronous device, so a new optional capability is a new field that
    older plugins never need to name.

    Example::

        capabilities = Capabilities(dtypes=(torch.bfloat16, torch.float32),
                                    graph_capture="XLA programs per padded bucket",
                                    distributed_backend="xla", ray_device_resource="TPU")
    """

    # Dtypes the platform runs (`--dtype` must be one; `resolve_dtype` picks among them).
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    # Attention head sizes its backend takes; None: any.
    head_sizes: Optional[tuple[int, ...]] = None
    # How `graph_runner` captures or compiles the forward, in a line for `engine plugins`;
    # None: it runs eagerly.
    graph_capture: Optional[str] = None
    # torch.distributed backend its process groups are created with (see `communicator`).
    distributed_backend: str = "gloo"
    # The Ray resource one rank reserves ("GPU", "TPU", a custom name the cluster
    # registers); None: the device is the host, a rank reserves one CPU.
    ray_device_resource: Optional[str] = None
    # Host memory can be page-locked (`pin_memory=True`) for asynchronous uploads.
    pinned_memory: bool = False
    # Work is queued: launches return before the device finishes and `create_event` gives
    # events that wait for it. The engine core then schedules step N+1 while step N runs
    # (async scheduling, unless --no-async-scheduling), hiding its host work.
    executes_asynchronously: bool = False
    # `peak_memory_bytes` measures something: the model runner then runs one full-size
    # profiling step and sizes the KV cache as total x gpu_memory_utilization - peak
    # (else free x gpu_memory_utilization - weights).
    measures_peak_memory: bool = False
    # KV-cache bytes when the user gives no --kv-cache-memory, for a device whose memory
    # the host shares (CPU: 4 GiB), at most what the measured budget allows; None: the
    # whole budget.
    default_kv_cache_memory: Optional[int] = None
    # Steps run under `torch.inference_mode()` (the cheapest no-grad mode); False: under
    # `torch.no_grad()`, for tensors that cannot be inference tensors (torch_xla's
    # functionalization rejects them).
    inference_mode: bool = True
    # Requests per step when the user sets no --max-num-seqs: a device that decodes a big
    # batch at the cost of a small one wants more (decodes ride along with prefill chunks
    # instead of waiting in waves).
    default_max_num_seqs: int = 256
    # Which ATTENTION_FEATURES it implements: "sliding_window" and "logits_soft_cap" (its
    # attention backends honour those AttentionSpec fields), "kv_cache_groups" (its graph
    # runner takes a GroupedAttentionMetadata and hands each layer's entry through). The
    # engine refuses a model that needs a feature its platform does not list.
    attention_features: frozenset[str] = frozenset()
    # Extra lines for `engine plugins` (attention kernel, kernel provider, ...).
    notes: Mapping[str, str] = field(default_factory=dict)


class Platform(abc.ABC):
    """One kind of device. Subclasses are registered through the `engine_platforms` hook.

    Members (the conformance kit, `platforms.testing`, names each): the class attributes
    `name`, `device_type`, `priority`, `api_version`, `capabilities`; `is_available`; the
    device and memory methods; the factories (`attention_backend`, `graph_runner`,
    `communicator`, `kernel_overrides`); `scheduling_constraints`, `resolve_dtype`,
    `validate` and `describe`.
    """

    name: ClassVar[str]  # what --device and `engine plugins` call it
    device_type: ClassVar[str]  # torch device type of its tensors, e.g. "cpu", "cuda"
    priority: ClassVar[int] = 0  # among available platforms, the highest wins
    api_version: ClassVar[int] = PLATFORM_API_VERSION  # the contract version it was written for
    capabilities: ClassVar[Capabilities] = Capabilities()  # what it can do (see Capabilities)

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """Cheap check, no heavy imports: can this platform run here?"""

    # ---- device & memory ----
    def device(self, local_rank: int = 0) -> torch.device:
        """The device the rank with this node-local index runs on."""
        return torch.device(self.device_type)

    def device_count(self) -> int:
        """Devices visible to this process (ranks per node at most)."""
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
        `capabilities.measures_peak_memory`. Example (CUDA)::

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

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """One layer's KV-cache tensor. It must hold finite values (zeros) before first use:
        padded attention reads slots no request has written yet, with zero weight."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def seed_everything(self, seed: int) -> None:
        """Seed every random generator a step may draw from (host and device)."""
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
        dtypes = self.capabilities.dtypes
        return model_dtype if model_dtype in dtypes else dtypes[0]

    def validate(self, config: PlatformConfig) -> list[str]:
        """Problems with running `config` here, each a sentence naming the flag to change;
        never changes it."""
        caps, problems = self.capabilities, []
        if config.dtype not in caps.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
            problems.append(
                f"dtype {str(config.dtype).removeprefix('torch.')} is not supported on "
                f"{self.name} (supported: {names}); pass --dtype with one of them."
            )
        head_size = config.model.head_dim
        if caps.head_sizes is not None and head_size not in caps.head_sizes:
            sizes = ", ".join(map(str, caps.head_sizes))
            problems.append(
                f"head size {head_size} is not supported by {self.name}'s attention "
                f"(supported: {sizes}); run the model on another platform with --device."
            )
        return problems

    # ---- factories ----
    @abc.abstractmethod
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """The attention backend for layers of this spec."""

    def graph_runner(self, forward: ModelForward, config: PlatformConfig,
                     attention: Sequence[AttentionBackend] = ()) -> GraphRunner:
        """How the model forward is compiled/captured and replayed (base: eager).

        `attention` are the backends this platform's `attention_backend` built for the
        model, through which every attention call of `forward` goes (see `GraphRunner`)."""
        return GraphRunner(forward, config, attention)

    def scheduling_constraints(self, config: PlatformConfig) -> Optional[StaticBatching]:
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
        `capabilities.distributed_backend`."""
        from platforms.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def kernel_overrides(self) -> list[KernelImpl]:
        """Named op implementations this platform prefers (see `platforms.kernels`)."""
        return []

    def describe(self) -> dict[str, Optional[str]]:
        """What `engine plugins` shows about this platform: its capabilities, then
        `capabilities.notes` (a "kernels" note stands in for asking `kernel_overrides`).
        Cheap (asked at discovery, device or not): override to add
        what only a running system knows (a driver version, the cards' names)."""
        caps = self.capabilities
        info: dict[str, Optional[str]] = {
            "device_type": self.device_type,
            "priority": str(self.priority),
            "graph_capture": caps.graph_capture or "none (eager)",
            "dtypes": ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes),
            "head_sizes": ", ".join(map(str, caps.head_sizes)) if caps.head_sizes else "any",
            "collectives": caps.distributed_backend,
            "attention_features": ", ".join(sorted(caps.attention_features)) or "none",
        }
        if "kernels" not in caps.notes:  # a platform whose kernels import heavily names them
            info["kernels"] = ", ".join(sorted({k.name for k in self.kernel_overrides()}
                                               )) or "reference"
        info.update(caps.notes)
        return info
