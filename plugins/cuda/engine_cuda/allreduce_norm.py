"""All-reduce, residual add and RMSNorm in one Triton kernel, over symmetric memory (NVLink
peer-to-peer), for the small batches of decode steps.

Rule: every rank of a group takes the same path for the same call (eligibility reads only
shape and dtype, which every rank shares), and every rank calls the kernel the same number
of times with the same row counts, as tensor-parallel forwards do: each row's program keeps
a call counter of its own that must agree across ranks.

How one row is reduced (one program per row, no second barrier):
* push: the program writes its row into slot (phase, row, my_rank) of EVERY rank's buffer
  (its own included), then, after a block barrier, stores the call's epoch into flag
  (phase, row, my_rank) of every rank with release semantics at system scope;
* wait: it spins (acquire, system scope) until flag (phase, row, r) of its own buffer holds
  the epoch for every rank r, then reads the rows from its OWN buffer (local reads only) and
  sums them in rank order, so every rank gets the same bits;
* then the residual add and the norm, in registers, with the numbers of the unfused path
  (the sum rounded to the input dtype, the residual added and rounded, normalised in float32).
The row's epoch is its call counter plus one; every thread reads the counter before any
thread writes the new value back (a block barrier between), so all warps agree on it.
Buffers alternate between two phases by the epoch's parity. A rank writes phase p of a row
again two calls later; by then it has seen every peer's flag of the call between, which a
peer stores only after its previous kernel (the one that read phase p) has finished, since a
stream runs kernels in order. So one barrier per call suffices and flags never need reset
(epochs only grow).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

SLOT_BYTES = 16 * 1024        # one row's slot: hidden sizes up to 8192 in bf16 / fp16
MAX_ROWS = 128                # rows per call the buffers hold (decode batches up to 128)
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _allreduce_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, counter_ptr, peers_ptr,
    stride_x, stride_r, stride_o, stride_s, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr,
    SLOT_ELEMS: tl.constexpr, FLAGS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    epoch = tl.load(counter_ptr + row) + 1
    # Every thread reads the counter before any writes it back: without this barrier a late
    # warp read the new value, waited for an epoch no peer would send, and hung the GPU.
    tl.debug_barrier()
    tl.store(counter_ptr + row, epoch)  # only this row's program touches its counter
    phase = epoch % 2
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    row64 = row.to(tl.int64)
    x = tl.load(x_ptr + row64 * stride_x + cols, mask=mask, other=0.0)
    peers = peers_ptr  # int64 addresses of every rank's buffer, in rank order
    slot_row = (phase * MAX_ROWS + row) * WORLD  # slot index of (phase, row, rank 0)
    for r in tl.static_range(WORLD):  # push my row into every rank's buffer
        base = tl.load(peers + r).to(tl.pointer_type(dtype))
        tl.store(base + (slot_row + RANK).to(tl.int64) * SLOT_ELEMS + cols, x, mask=mask)
    tl.debug_barrier()  # every thread's stores precede the release below
    for r in tl.static_range(WORLD):
        flags = (tl.load(peers + r) + FLAGS_OFFSET).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + slot_row + RANK, epoch, sem="release", scope="sys")
    mine = tl.load(peers + RANK)
    my_flags = (mine + FLAGS_OFFSET).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(WORLD):
        while tl.atomic_add(my_flags + slot_row + r, 0, sem="acquire", scope="sys") != epoch:
            pass
    tl.debug_barrier()
    my_data = mine.to(tl.pointer_type(dtype))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):  # rank order: the same sum on every rank
        part = tl.load(my_data + (slot_row + r).to(tl.int64) * SLOT_ELEMS + cols, mask=mask,
                       other=0.0, cache_modifier=".cv")
        acc += part.to(tl.float32)
    total = acc.to(dtype)  # what all_reduce would have returned
    r_in = tl.load(res_ptr + row64 * stride_r + cols, mask=mask, other=0.0)
    total = (total.to(tl.float32) + r_in.to(tl.float32)).to(dtype)
    tl.store(sum_ptr + row64 * stride_s + cols, total, mask=mask)
    t32 = total.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(t32 * t32, 0) / hidden + eps)
    normed = (t32 * inv_rms).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row64 * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def buffer_bytes(world_size: int) -> tuple[int, int]:
    """(bytes of the data slots, bytes in all) of one group's symmetric buffer."""
    data = 2 * MAX_ROWS * world_size * SLOT_BYTES
    return data, data + 2 * MAX_ROWS * world_size * 4


class FusedAllReduceNorm:
    """One group's symmetric buffer (data slots, then int32 flags), the peers' addresses and
    the per-row call counters. Build with `create` (collective)."""

    def __init__(self, buffer: torch.Tensor, handle: Any, rank: int, world_size: int,
                 max_bytes: int) -> None:
        self._buffer = buffer
        self._handle = handle  # keeps the peers' mappings alive
        self.rank, self.world_size, self.max_bytes = rank, world_size, max_bytes
        self.device = buffer.device
        self._peers = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64,
                                   device=self.device)
        self._counters = torch.zeros(MAX_ROWS, dtype=torch.int32, device=self.device)
        self._flags_offset = buffer_bytes(world_size)[0]

    def can_fuse(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call takes the kernel: shapes and dtypes only (alike on every rank)."""
        if x.dim() != 2 or x.dtype not in FUSED_DTYPES or x.device != self.device:
            return False
        rows, hidden = x.shape
        nbytes = rows * hidden * x.element_size()
        return (0 < rows <= MAX_ROWS and hidden * x.element_size() <= SLOT_BYTES
                and nbytes <= self.max_bytes and residual.shape == x.shape
                and residual.dtype == x.dtype and weight.shape == (hidden,))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, hidden = x.shape
        if x.stride(-1) != 1:
            x = x.contiguous()
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
        summed = torch.empty_like(x)
        block = triton.next_power_of_2(hidden)
        _allreduce_add_rms_norm_kernel[(rows,)](
            x, residual, weight, out, summed, self._counters, self._peers,
            x.stride(0), residual.stride(0), out.stride(0), summed.stride(0), hidden, eps,
            RANK=self.rank, WORLD=self.world_size, MAX_ROWS=MAX_ROWS,
            SLOT_ELEMS=SLOT_BYTES // x.element_size(), FLAGS_OFFSET=self._flags_offset,
            BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
        return out, summed

    def destroy(self) -> None:
        self._buffer = self._handle = None  # type: ignore[assignment]

    @classmethod
    def create(cls, group: Any, device: torch.device, max_bytes: int
               ) -> tuple[Optional[FusedAllReduceNorm], str]:
        """Collective over `group`, after the one-shot all-reduce was set up on every rank
        (so the group can use symmetric memory): the fused path, or None with the reason,
        the same answer on every rank."""
        import torch.distributed as dist

        from engine_cuda.symm_allreduce import _agree, _allocate, _rendezvous, _try

        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        total = buffer_bytes(world_size)[1]
        buffer, error = _try(lambda: _allocate(total, device))
        if not _agree(buffer is not None, group, device):
            return None, f"symmetric allocation failed ({error or 'on another rank'})"
        buffer.zero_()  # flags start below every epoch; done before any peer can signal
        torch.cuda.synchronize(device)
        handle, error = _try(lambda: _rendezvous(buffer, group.group_name))
        if not _agree(handle is not None, group, device):
            return None, f"symmetric rendezvous failed ({error or 'on another rank'})"
        fused = cls(buffer, handle, rank, world_size, max_bytes)
        passed, error = _try(lambda: fused._self_test())
        if not _agree(bool(passed), group, device):
            fused.destroy()
            return None, f"self-test failed ({error or 'wrong result or another rank'})"
        return fused, ""

    def _self_test(self) -> bool:
        """Twice (both phases), known integers exact in bf16: the sum must be world*(w+1)/2
        on every element, plus the residual."""
        want = float(self.world_size * (self.world_size + 1) // 2)
        weight = torch.ones(64, dtype=torch.bfloat16, device=self.device)
        for _ in range(2):
            x = torch.full((2, 64), self.rank + 1, dtype=torch.bfloat16, device=self.device)
            residual = torch.ones_like(x)
            _, summed = self(x, residual, weight, 1e-6)
            if not bool((summed == want + 1).all().item()):
                return False
        return True
