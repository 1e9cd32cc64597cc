"""Conformance check for a platform's communicator: collectives give the right values across
real processes.

Rule: `world_size` processes are spawned, each joins a fresh `torch.distributed` group on
127.0.0.1 with the platform's `capabilities.distributed_backend`, wraps it with
`platform.communicator`, and checks every collective against values it can compute alone. Failures come back to the
parent as text; a hung collective is a timeout, not a hang.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

from platforms.interface import Platform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expect(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.detach().to("cpu", torch.float64)
    if got.shape != want.shape or not torch.allclose(got, want.double(), atol=1e-5):
        raise AssertionError(f"{name}: got {got.flatten()[:8].tolist()} shape {tuple(got.shape)},"
                             f" want {want.flatten()[:8].tolist()} shape {tuple(want.shape)}")


def _check_all_reduce_add_rms_norm(comm, rank: int, world: int, device) -> None:
    """The fused all-reduce + residual add + RMSNorm against the reference on the sum, at
    two shapes (a fused kernel may take only some), twice each (a kernel that keeps state
    between calls must be right the second time too)."""
    from platforms.kernels import REFERENCE

    ref = REFERENCE["fused_add_rms_norm"]

    def part(r: int, rows: int, hidden: int) -> torch.Tensor:  # rank r's, known to all
        return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1000 * rows + r))

    for rows, hidden in ((3, 8), (2, 4096)):
        residual = torch.linspace(-1, 1, rows * hidden).reshape(rows, hidden)
        weight = torch.linspace(0.5, 1.5, hidden)
        total = sum(part(r, rows, hidden) for r in range(world))
        want_norm, want_sum = ref(total, residual, weight, 1e-6)
        for _ in range(2):
            got_norm, got_sum = comm.all_reduce_add_rms_norm(
                part(rank, rows, hidden).to(device), residual.to(device), weight.to(device),
                1e-6, ref)
            for name, got, want in (("normed", got_norm, want_norm), ("sum", got_sum, want_sum)):
                got = got.detach().to("cpu", torch.float64)
                if got.shape != want.shape or not torch.allclose(got, want.double(), atol=1e-4,
                                                                 rtol=1e-4):
                    raise AssertionError(
                        f"all_reduce_add_rms_norm {rows}x{hidden} ({name}): got "
                        f"{got.flatten()[:6].tolist()}, want {want.flatten()[:6].tolist()}")


def _rank_main(rank: int, platform_cls: type[Platform], world: int, port: int,
               results: mp.Queue) -> None:
    import torch.distributed as dist

    try:
        platform = platform_cls()
        device = platform.device(rank % platform.device_count())
        platform.set_device(device)
        dist.init_process_group(platform.capabilities.distributed_backend,
                                init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
        comm = platform.communicator(dist.group.WORLD)
        assert (comm.rank, comm.world_size) == (rank, world), (comm.rank, comm.world_size)

        def mine(r: int) -> torch.Tensor:  # rank r's tensor, known to every rank
            return torch.arange(2 * world * 3, dtype=torch.float32).reshape(2 * world, 3) + 100 * r

        x = mine(rank).to(device)
        total = sum(mine(r) for r in range(world))
        _expect("all_reduce", comm.all_reduce(x), total)
        _check_all_reduce_add_rms_norm(comm, rank, world, device)
        _expect("all_gather", comm.all_gather(x, dim=0), torch.cat([mine(r) for r in range(world)]))
        _expect("all_gather dim 1", comm.all_gather(x, dim=1),
                torch.cat([mine(r) for r in range(world)], dim=1))
        _expect("reduce_scatter", comm.reduce_scatter(x, dim=0), total.chunk(world)[rank])
        b = comm.broadcast(mine(rank).to(device), src=world - 1)
        _expect("broadcast", b, mine(world - 1))
        _expect("all_to_all", comm.all_to_all(x),
                torch.cat([mine(r).chunk(world)[rank] for r in range(world)]))
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        buf = torch.empty_like(x)
        if rank % 2 == 0:
            comm.send(x, nxt)
            got = comm.recv(buf, prv)
        else:
            got = comm.recv(buf, prv)
            comm.send(x, nxt)
        _expect("send/recv", got, mine(prv))
        comm.barrier()
        comm.destroy()
        dist.destroy_process_group()
        results.put((rank, None))
    except BaseException:  # report everything, the parent decides
        results.put((rank, traceback.format_exc()))


def check_communicator(platform_cls: type[Platform], world_size: int = 2,
                       timeout_s: float = 120.0) -> None:
    """Spawn `world_size` ranks of `platform_cls` and check every collective; raise
    AssertionError with each failing rank's traceback. The class must be importable by name
    (spawned processes import it)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, platform_cls, world_size, port, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    failures: dict[int, str] = {}
    answered: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(answered) < world_size:
            try:
                rank, error = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in answered and p.exitcode not in (None, 0)]
                if dead:  # a rank died without reporting (crash at import, signal)
                    failures.update({r: f"exited with code {procs[r].exitcode}" for r in dead})
                    break
                if time.monotonic() > deadline:
                    failures[-1] = f"no answer from every rank within {timeout_s} s"
                    break
                continue
            answered.add(rank)
            if error is not None:
                failures[rank] = error
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if failures:
        text = "\n".join(f"rank {r}:\n{e}" for r, e in sorted(failures.items()))
        raise AssertionError(f"communicator of {platform_cls.__name__} failed:\n{text}")
