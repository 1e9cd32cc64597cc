"""ACL graphs for decode steps: captured per batch size, replayed on static buffers.

Rule: a captured graph reads only its static buffers (ids, positions, slots, block table,
KV lengths), refilled every step; a decode step is padded with scratch requests
(`AscendAttentionMetadata.padded_decode`) to the smallest captured size, and only its real
rows come back. Steps with prefill chunks, or more requests than the largest size, run
eagerly. How a graph is made is a factory: `NpuGraph` (torch.npu.NPUGraph, imported on an
NPU) or `EagerReplay` (re-runs the forward on the same buffers: CPU tests of this logic).

Open on hardware: the fused ops also take host integer lists (query ends, KV lengths) that
a captured graph keeps from capture time; torch_npu refreshes them through graph task
updates, which this runner does not do. So ACL graphs are opt-in (ENGINE_ASCEND_ACL_GRAPH=1)
until that is checked on a card.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional

import torch

from engine_ascend.attention import AscendAttentionMetadata
from platforms.interface import AttentionBackend, DummyBatchFactory, GraphRunner, ModelForward

if TYPE_CHECKING:
    from platforms.config import PlatformConfig

_REFILLED = ("slot_mapping", "block_table", "seq_lens")


class EagerReplay:
    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class NpuGraph:
    """`fn` captured once into an ACL graph (torch.npu.NPUGraph)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        import torch_npu  # noqa: F401  (adds torch.npu)

        fn()  # one eager run first: lazy initialisation stays out of the graph
        self._graph = torch.npu.NPUGraph()
        with torch.npu.graph(self._graph):
            self._out = fn()

    def replay(self) -> torch.Tensor:
        self._graph.replay()
        return self._out


@dataclasses.dataclass
class _Captured:
    ids: torch.Tensor
    pos: torch.Tensor
    md: AscendAttentionMetadata
    graph: Optional[object] = None


def capture_sizes(max_num_seqs: int, limit: int = 128) -> tuple[int, ...]:
    sizes, n = [], 1
    while n < min(max_num_seqs, limit):
        sizes.append(n)
        n *= 2
    return (*sizes, min(max_num_seqs, limit))


class AclGraphRunner(GraphRunner):
    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = (), *, make_graph=EagerReplay) -> None:
        super().__init__(forward, config, attention)
        self.make_graph = make_graph
        self.captured_sizes = capture_sizes(config.max_num_seqs)
        self.graphs: dict[int, _Captured] = {}
        self.max_blocks = config.max_blocks_per_req

    def capture(self, make_batch: DummyBatchFactory) -> None:
        for size in reversed(self.captured_sizes):
            ids, pos, md = make_batch(size)
            # The block table buffer is as wide as the longest request may need.
            table = torch.zeros((size, self.max_blocks), dtype=md.block_table.dtype,
                                device=md.block_table.device)
            table[:, : md.block_table.shape[1]] = md.block_table
            static = _Captured(ids.clone(), pos.clone(), dataclasses.replace(
                md, slot_mapping=md.slot_mapping.clone(), seq_lens=md.seq_lens.clone(),
                block_table=table))
            static.graph = self.make_graph(
                lambda s=static: self.forward(s.ids, s.pos, s.md))
            self.graphs[size] = static

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: AscendAttentionMetadata) -> torch.Tensor:
        n = attn_metadata.num_reqs
        size = next((s for s in self.captured_sizes if s >= n), None)
        if not attn_metadata.decode_only or size is None or size not in self.graphs:
            return self.forward(input_ids, positions, attn_metadata)
        static = self.graphs[size]
        padded = attn_metadata.padded_decode(size)
        static.ids.zero_()[:n].copy_(input_ids[:n])
        static.pos.zero_()[:n].copy_(positions[:n])
        for name in _REFILLED:
            buf, new = getattr(static.md, name), getattr(padded, name)
            if name == "block_table":  # captured at the widest a request can need
                buf.zero_()[:, : new.shape[1]].copy_(new)
            else:
                buf.copy_(new)
        # Host lists: what the eager stand-in reads (a captured graph keeps its own).
        static.md = dataclasses.replace(static.md, query_ends=padded.query_ends,
                                        kv_lens=padded.kv_lens)
        assert static.graph is not None
        return static.graph.replay()[:n]
