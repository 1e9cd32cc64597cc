"""The CPU platform's communicator across two real processes (gloo), through the engine's own
`ParallelGroups`: every collective gives the right values, and groups come and go cleanly."""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
import torch

from engine.distributed import ParallelGroups, RankLayout, free_port
from platforms.cpu.platform import CpuPlatform


def _collectives(comm, rank: int) -> None:
    world = comm.world_size
    x = torch.arange(4, dtype=torch.float32) + 10 * rank  # rank 0: 0..3, rank 1: 10..13
    expected_sum = sum(torch.arange(4, dtype=torch.float32) + 10 * r for r in range(world))
    torch.testing.assert_close(comm.all_reduce(x), expected_sum)
    assert torch.equal(x, torch.arange(4, dtype=torch.float32) + 10 * rank)  # not in place

    gathered = comm.all_gather(x.view(2, 2), dim=1)
    assert gathered.shape == (2, 4)
    torch.testing.assert_close(gathered[:, 2:], (torch.arange(4.0) + 10).view(2, 2))
    torch.testing.assert_close(gathered[:, :2], torch.arange(4.0).view(2, 2))

    scattered = comm.reduce_scatter(x, dim=0)
    torch.testing.assert_close(scattered, expected_sum.chunk(world)[rank])

    b = torch.full((3,), float(rank))
    torch.testing.assert_close(comm.broadcast(b, src=1), torch.full((3,), 1.0))

    if rank == 0:
        comm.send(torch.tensor([7, 8, 9]), dst=1)
    else:
        got = comm.recv(torch.empty(3, dtype=torch.int64), src=0)
        assert got.tolist() == [7, 8, 9]

    # chunk j of rank r holds 100 * r + j; rank r receives chunk r of everyone.
    a2a = comm.all_to_all(torch.tensor([100 * rank + j for j in range(world)]))
    assert a2a.tolist() == [100 * r + rank for r in range(world)]
    comm.barrier()


def _rank_main(rank: int, ports: list[int], queue) -> None:
    try:
        torch.set_num_threads(1)
        platform = CpuPlatform()
        for port in ports:  # a second world on a fresh port: nothing leaked from the first
            groups = ParallelGroups(platform, RankLayout(2, 1), rank, f"tcp://127.0.0.1:{port}")
            assert groups.context.tp_rank == rank and groups.context.tp_size == 2
            _collectives(groups.tp_comm, rank)
            assert groups.pp_comm.world_size == 1
            groups.destroy()
        queue.put((rank, "ok"))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def test_cpu_communicator_collectives_two_processes():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ports = [free_port(), free_port()]
    procs = [ctx.Process(target=_rank_main, args=(r, ports, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {0: "ok", 1: "ok"}, results


def test_rank_layout_groups():
    layout = RankLayout(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert layout.tp_groups() == [[0, 1], [2, 3]]
    assert layout.pp_groups() == [[0, 2], [1, 3]]
    assert layout.coords(3) == (1, 1)
    with pytest.raises(ValueError, match="outside"):
        layout.coords(4)
