"""Expert-parallel dispatch and combine across two real processes (gloo): the partial
outputs of the two ranks sum to what one rank computes with every expert, including
experts no token chooses, a token count that does not split evenly, and a rank whose
experts receive nothing."""

from __future__ import annotations

import multiprocessing
import traceback

import torch

from engine.distributed import ParallelGroups, RankLayout, free_port
from engine.models.layers.expert_parallel import ExpertParallel
from platforms.cpu.platform import CpuPlatform

NUM_EXPERTS, HIDDEN, TOP_K = 8, 16, 2


def _weights():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(NUM_EXPERTS, HIDDEN, HIDDEN, generator=gen)


def _experts(weights, start: int):
    """A stand-in expert e: x @ W[e] (the dispatch does not care what an expert is)."""
    def run(x, ids):
        out = torch.zeros_like(x)
        for e in range(len(weights) if start is None else NUM_EXPERTS // 2):
            rows = ids == e
            out[rows] = x[rows] @ weights[e + (start or 0)]
        return out
    return run


def _cases():
    gen = torch.Generator().manual_seed(1)
    for num_tokens, high in ((7, NUM_EXPERTS), (1, NUM_EXPERTS), (12, 4), (5, 2)):
        hidden = torch.randn(num_tokens, HIDDEN, generator=gen)
        ids = torch.stack([torch.randperm(high, generator=gen)[:TOP_K]
                           for _ in range(num_tokens)])
        weights = torch.rand(num_tokens, TOP_K, generator=gen)
        yield hidden, weights, ids


def _reference(hidden, weights, ids, expert_weights):
    out = torch.zeros_like(hidden)
    for t in range(len(hidden)):
        for j in range(TOP_K):
            out[t] += weights[t, j] * (hidden[t] @ expert_weights[ids[t, j]])
    return out


def _rank_main(rank: int, port: int, queue) -> None:
    try:
        torch.set_num_threads(1)
        groups = ParallelGroups(CpuPlatform(), RankLayout(2, 1), rank,
                                f"tcp://127.0.0.1:{port}", expert_parallel=True)
        assert groups.context.expert_parallel
        comm = groups.tp_comm
        ep = ExpertParallel(comm, NUM_EXPERTS)
        assert ep.expert_start == 4 * rank and ep.num_local_experts == 4
        expert_weights = _weights()
        for hidden, weights, ids in _cases():
            partial = ep(hidden, weights, ids, _experts(expert_weights, ep.expert_start))
            total = comm.all_reduce(partial)
            torch.testing.assert_close(total, _reference(hidden, weights, ids, expert_weights),
                                       rtol=1e-5, atol=1e-5)
        groups.destroy()
        queue.put((rank, "ok"))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def test_two_ranks_sum_to_one_rank_with_every_expert():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: "ok", 1: "ok"}, results
