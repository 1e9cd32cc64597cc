"""A one-shot all-reduce over symmetric memory (NVLink peer-to-peer), for small messages.

Rule: every rank of a group takes the same path for the same call. Setup is collective and
ends with one agreed answer on every rank (a `SymmAllReduce` everywhere or None everywhere),
and the per-call choice (`is_eligible`) reads only the dtype and the size, which every rank
shares. Multicast (NVLS, multimem) is never used: only the peer-to-peer one-shot op.

Why: a tensor-parallel decode step makes two all-reduces per layer of a few KiB each; NCCL
costs 15-55 us for those, a one-shot kernel that reads each peer's copy over NVLink a few.
Each rank copies its input into its own slice of a symmetric buffer; the kernel waits for
every peer, sums the peers' slices into a fresh output, and waits again (so the buffer can be
reused by the next call). The ops are PyTorch's (`torch.ops.symm_mem`), for bf16 and fp32 on
2..8 GPUs of one host; fp16 goes to NCCL (the kernels dispatch float and bfloat16 only).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

# Multicast objects can take a shared host's GPUs out of service: keep them off before any
# symmetric-memory allocation (the allocator reads this when it maps a buffer).
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402

logger = logging.getLogger(__name__)

ENABLE_ENV = "ENGINE_CUSTOM_ALLREDUCE"          # "0" turns the fast path off
MAX_KB_ENV = "ENGINE_CUSTOM_ALLREDUCE_MAX_KB"   # largest message (KiB) the fast path takes
MIN_WORLD_SIZE, MAX_WORLD_SIZE = 2, 8           # the one-shot kernel's world sizes
FAST_DTYPES = (torch.bfloat16, torch.float32)   # what the symm_mem kernels dispatch
LIMIT_MAX_BYTES = 64 * 1024 * 1024              # a sane ceiling for MAX_KB_ENV
REQUIRED_OPS = ("one_shot_all_reduce",)


def default_max_bytes(world_size: int) -> int:
    """Largest message the one-shot path takes by default.

    One-shot reads (world_size - 1) x nbytes from peers per rank against NCCL's ring
    ~2 x nbytes: on 2 GPUs it wins up to about a MiB (decode batches up to 128 tokens of a
    4096-wide model); with more peers its read volume grows, so the ceiling shrinks."""
    if world_size <= 2:
        return 1024 * 1024
    if world_size <= 4:
        return 512 * 1024
    return 256 * 1024


def parse_max_bytes(value: Optional[str], world_size: int) -> int:
    """`ENGINE_CUSTOM_ALLREDUCE_MAX_KB` in bytes (unset: `default_max_bytes`)."""
    if value is None or value.strip() == "":
        return default_max_bytes(world_size)
    try:
        kib = int(value)
    except ValueError:
        kib = -1
    if not 0 < kib * 1024 <= LIMIT_MAX_BYTES:
        raise ValueError(
            f"{MAX_KB_ENV}={value!r}: expected a whole number of KiB in 1.."
            f"{LIMIT_MAX_BYTES // 1024}; unset it for the default "
            f"({default_max_bytes(world_size) // 1024} KiB at {world_size} ranks)."
        )
    return kib * 1024


def is_eligible(dtype: torch.dtype, nbytes: int, max_bytes: int) -> bool:
    """Whether one call takes the fast path. Reads only what every rank shares (dtype and
    size), so all ranks choose alike. The kernel needs the size 4-byte aligned."""
    return dtype in FAST_DTYPES and 0 < nbytes <= max_bytes and nbytes % 4 == 0


@dataclass(frozen=True)
class RankFacts:
    """What one rank tells the others at setup."""

    hostname: str
    device_uuid: str
    env_value: Optional[str]   # ENGINE_CUSTOM_ALLREDUCE as this rank sees it
    has_ops: bool              # torch.ops.symm_mem has the ops
    max_bytes: int             # this rank's ceiling; -1 when its MAX_KB variable is invalid


def setup_problems(world_size: int, facts: Sequence[RankFacts]) -> list[str]:
    """Why the fast path cannot be set up for this group (empty: it can). A pure function of
    what every rank gathered, so every rank gets the same answer."""
    if not MIN_WORLD_SIZE <= world_size <= MAX_WORLD_SIZE:
        return [f"group of {world_size} ranks (the one-shot kernel takes "
                f"{MIN_WORLD_SIZE}..{MAX_WORLD_SIZE})"]
    problems = []
    if any(f.env_value == "0" for f in facts):
        problems.append(f"{ENABLE_ENV}=0")
    if not all(f.has_ops for f in facts):
        problems.append("this torch has no torch.ops.symm_mem." + REQUIRED_OPS[0])
    if len({f.hostname for f in facts}) > 1:
        problems.append("ranks on several hosts")
    if len({f.device_uuid for f in facts}) < len(facts):
        problems.append("two ranks share one GPU")
    if any(f.max_bytes <= 0 for f in facts):
        problems.append(f"invalid {MAX_KB_ENV} on some rank")
    elif len({f.max_bytes for f in facts}) > 1:
        problems.append(f"ranks disagree on {MAX_KB_ENV}")
    return problems


def _has_ops() -> bool:
    try:
        return all(hasattr(torch.ops.symm_mem, op) for op in REQUIRED_OPS)
    except (AttributeError, RuntimeError):
        return False


def _device_uuid(index: int) -> str:
    return str(getattr(torch.cuda.get_device_properties(index), "uuid", f"index-{index}"))


def _local_facts(device: torch.device, world_size: int) -> RankFacts:
    try:
        max_bytes = parse_max_bytes(os.environ.get(MAX_KB_ENV), world_size)
    except ValueError as e:
        logger.warning("%s", e)
        max_bytes = -1
    return RankFacts(hostname=socket.gethostname(), device_uuid=_device_uuid(device.index),
                     env_value=os.environ.get(ENABLE_ENV), has_ops=_has_ops(),
                     max_bytes=max_bytes)


def _peers_reachable(device: torch.device, facts: Sequence[RankFacts]) -> bool:
    """P2P access from this GPU to every peer's GPU. A peer this process cannot see (one
    visible GPU per process) cannot be checked, so it counts as unreachable."""
    visible = {_device_uuid(i): i for i in range(torch.cuda.device_count())}
    mine = _device_uuid(device.index)
    for f in facts:
        if f.device_uuid == mine:
            continue
        peer = visible.get(f.device_uuid)
        if peer is None or not torch.cuda.can_device_access_peer(device.index, peer):
            return False
    return True


def _agree(ok: bool, group: Any, device: torch.device) -> bool:
    """True on every rank iff `ok` on every rank (one NCCL MIN all-reduce)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class SymmAllReduce:
    """The fast path of one group: a symmetric buffer of `max_bytes` and the one-shot op.

    Build it with `create` (collective); call `all_reduce` only for tensors `can_reduce`
    accepts. The result is a fresh tensor (the communicator contract)."""

    def __init__(self, buffer: torch.Tensor, handle: Any, group_name: str,
                 device: torch.device, max_bytes: int, world_size: int) -> None:
        self._buffer = buffer      # [max_bytes] uint8, symmetric across the group
        self._handle = handle      # keeps the peers' mappings alive
        self.group_name = group_name
        self.device = device
        self.max_bytes = max_bytes
        self.world_size = world_size
        ops = torch.ops.symm_mem
        # The copy variant moves the input into the buffer inside the kernel (one launch
        # instead of two); older torch lacks it.
        self._copy_op: Optional[Callable[..., torch.Tensor]] = (
            ops.one_shot_all_reduce_copy if hasattr(ops, "one_shot_all_reduce_copy") else None)
        self._op: Callable[..., torch.Tensor] = ops.one_shot_all_reduce

    @property
    def uses_copy_op(self) -> bool:
        return self._copy_op is not None

    def can_reduce(self, x: torch.Tensor) -> bool:
        return x.device == self.device and is_eligible(
            x.dtype, x.numel() * x.element_size(), self.max_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of `x` (which `can_reduce` accepted), as a new tensor. No host
        sync and no allocation beyond the output: safe inside CUDA-graph capture."""
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        slot = self._buffer[:nbytes].view(x.dtype).view(x.shape)  # offset 0: 16-B aligned
        # The copy op wants the input as aligned as the slot; a view that starts mid-way
        # through its storage may not be, so it is staged with a copy first.
        if self._copy_op is not None and (x.storage_offset() * x.element_size()) % 16 == 0:
            return self._copy_op(slot, x, "sum", self.group_name)
        slot.copy_(x)
        return self._op(slot, "sum", self.group_name)

    def destroy(self) -> None:
        """Drop the buffer. Every op that read it has finished once this rank's stream has
        (each kernel ends by waiting for all peers), so no barrier is needed."""
        self._buffer = self._handle = None  # type: ignore[assignment]

    # ---- setup ----
    @classmethod
    def create(cls, group: Any, device: torch.device, max_bytes: Optional[int] = None
               ) -> tuple[Optional[SymmAllReduce], str]:
        """Collective over `group` (call on every rank): the fast path, or None with the
        reason, the same answer on every rank. `max_bytes` (the same on every rank)
        overrides the environment's ceiling, for benchmarks."""
        import torch.distributed as dist

        world_size = dist.get_world_size(group)
        if not MIN_WORLD_SIZE <= world_size <= MAX_WORLD_SIZE:  # same on every rank
            return None, setup_problems(world_size, [])[0]
        gathered: list[Optional[RankFacts]] = [None] * world_size
        dist.all_gather_object(gathered, _local_facts(device, world_size), group=group)
        facts = [f for f in gathered if f is not None]
        problems = setup_problems(world_size, facts)
        if not problems and not _peers_reachable(device, facts):
            problems.append("no P2P access between these GPUs (or a peer GPU not visible "
                            "to this process)")
        if not _agree(not problems, group, device):
            return None, "; ".join(problems) or "another rank cannot use it"
        if max_bytes is None:
            max_bytes = facts[0].max_bytes
        group_name = group.group_name

        buffer, error = _try(lambda: _allocate(max_bytes, device))
        if not _agree(buffer is not None, group, device):
            return None, f"symmetric allocation failed ({error or 'on another rank'})"
        handle, error = _try(lambda: _rendezvous(buffer, group_name))
        if not _agree(handle is not None, group, device):
            return None, f"symmetric rendezvous failed ({error or 'on another rank'})"
        fast = cls(buffer, handle, group_name, device, max_bytes, world_size)
        passed, error = _try(lambda: fast._self_test(dist.get_rank(group)))
        if not _agree(bool(passed), group, device):
            fast.destroy()
            return None, f"self-test failed ({error or 'wrong sum or another rank'})"
        return fast, ""

    def _self_test(self, rank: int) -> bool:
        """One small and one odd-sized sum of known integers (exact in bf16)."""
        want = self.world_size * (self.world_size + 1) // 2
        for numel in (2048, 6):
            x = torch.full((numel,), rank + 1, dtype=torch.bfloat16, device=self.device)
            if not bool((self.all_reduce(x) == want).all().item()):
                return False
        return True


def _allocate(max_bytes: int, device: torch.device) -> torch.Tensor:
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)


def _rendezvous(buffer: torch.Tensor, group_name: str) -> Any:
    """Exchange the buffer's handles with the peers (collective). Recent torch registers the
    group itself; older torch wants `enable_symm_mem_for_group` first, so that is tried on
    the error only (every rank then takes the same retry)."""
    import torch.distributed._symmetric_memory as symm_mem

    try:
        return symm_mem.rendezvous(buffer, group_name)
    except RuntimeError as e:
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is None or "group" not in str(e).lower():
            raise
        enable(group_name)
        return symm_mem.rendezvous(buffer, group_name)


def _try(step: Callable[[], Any]) -> tuple[Any, str]:
    """(result, "") or (None, the error): a failing setup step must still reach the
    agreement that follows it, or the other ranks would wait there forever."""
    try:
        return step(), ""
    except Exception as e:  # noqa: BLE001 - any failure means "fall back to NCCL"
        logger.debug("symmetric-memory setup step failed", exc_info=True)
        return None, f"{type(e).__name__}: {e}"
