"""CUDA graphs for the model forward: full graphs for decode batches, piecewise graphs around
attention for small mixed batches, eager for everything larger.

Rule: a replay reads only static buffers. Every step copies its real inputs (and, for decode
graphs, its attention metadata) into buffers captured once, pads the batch to the next
captured size with rows that change nothing (token 0, seq_len 0, slot -1), and returns rows
for the real tokens only; the core never sees padding.

* Pure-decode batches (every request has one new token, `max_query_len == 1`) of up to
  `DECODE_MAX_BATCH` requests replay one graph holding the whole forward, attention included.
  The Triton attention launch grid then has to be the same at every replay: the captured
  metadata says `max_seq_len = max_model_len` (so the split-K count is fixed per size), the
  block table is padded to [size, blocks for max_model_len], and padded requests have
  seq_len 0 and slot -1, which the kernels skip.
* Mixed batches of up to `PIECEWISE_MAX_TOKENS` tokens replay the forward as pieces: the
  stretches between two attention calls are graphs, attention runs eagerly between them on
  the real tokens with the step's own metadata (its grid depends on the mix of prefill and
  decode, so it cannot be captured once). The split is made at capture time through the
  attention backends the model runner hands the runner (`GraphRunner.attention`, built by
  this platform): while the runner captures, each backend's `capture_hook` sends every
  attention call to the runner, which copies q/k/v into static buffers, ends the current
  graph, records the call, and begins the next graph. The model itself is never touched.
* All graphs share one memory pool; sizes are captured largest first.

KV-cache groups (Gemma's sliding and global layers): the forward's metadata is then a
`GroupedAttentionMetadata`, one entry per group, and each layer reads its group's entry. The
requests are the same in every group, so a decode graph shares token ids, positions,
query_start_loc and seq_lens among groups, and keeps a block table and slot mapping per
group; a piecewise replay runs each recorded attention call with its own group's entry. Which
group a call belongs to is read off the capture itself (the entry of the grouped dummy
batch the call was handed), so it does not depend on the order of `attention`.

Buffers shared between pieces rely on one property of the models: an attention output is
read before the next attention call (by the output projection), so one q/k/v/out buffer per
shape serves every layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from engine_cuda.platform import DECODE_MAX_BATCH, PIECEWISE_MAX_TOKENS
from platforms.config import PlatformConfig
from platforms.interface import (
    AttentionBackend,
    CommonAttentionMetadata,
    DummyBatchFactory,
    GraphRunner,
    GroupedAttentionMetadata,
    ModelForward,
)

if TYPE_CHECKING:
    from engine_cuda.attention import TritonAttentionBackend  # imports triton

logger = logging.getLogger(__name__)
# Captured sizes up to a limit: dense where padding would cost most, sparser above.
_SIZE_STEPS = ((8, None), (32, 8), (64, 16), (256, 32), (1 << 30, 64))


def capture_sizes(limit: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ..., 256, 320, ... up to `limit`, which is
    always included (so every batch up to `limit` has a size to pad to)."""
    if limit < 1:
        return ()
    sizes, size = [], 1
    while size <= limit:
        sizes.append(size)
        step = next(s for top, s in _SIZE_STEPS if size < top)
        size = size * 2 if step is None else size + step
    if sizes[-1] != limit:
        sizes.append(limit)
    return tuple(sizes)


def padded_size(sizes: Sequence[int], num: int) -> Optional[int]:
    """The smallest captured size holding `num` rows; None when `num` is above them all."""
    for size in sizes:  # short and sorted: a scan beats bisect's overhead here
        if size >= num:
            return size
    return None


def max_decode_batch(config: PlatformConfig) -> int:
    """The largest decode batch captured: max_num_seqs, at most DECODE_MAX_BATCH."""
    return min(config.max_num_seqs, DECODE_MAX_BATCH)


def decode_sizes(config: PlatformConfig) -> tuple[int, ...]:
    return capture_sizes(max_decode_batch(config))


def mixed_sizes(config: PlatformConfig) -> tuple[int, ...]:
    return capture_sizes(min(config.max_num_batched_tokens, PIECEWISE_MAX_TOKENS))


def graph_problems(config: PlatformConfig) -> list[str]:
    """What in `config` CUDA graphs cannot serve (checked by `CudaPlatform.validate`)."""
    problems = []
    table_bytes = max_decode_batch(config) * config.max_blocks_per_req * 4
    if table_bytes > 1 << 30:
        problems.append(
            f"the padded block table of a captured decode graph would take "
            f"{table_bytes / 2**30:.1f} GiB (max_model_len {config.max_model_len}, "
            f"block_size {config.block_size}); raise --block-size, lower "
            "--max-model-len, or pass --enforce-eager."
        )
    return problems


def first_entry(metadata: Any) -> Any:
    """The metadata itself, or a grouped one's first entry (groups share the requests)."""
    if isinstance(metadata, GroupedAttentionMetadata):
        return next((m for m in metadata if m is not None), None)
    return metadata


def group_entries(metadata: Any) -> list[tuple[int, Any]]:
    """(group, metadata) of each group present; one group 0 for ungrouped metadata."""
    if isinstance(metadata, GroupedAttentionMetadata):
        return [(g, m) for g, m in enumerate(metadata) if m is not None]
    return [(0, metadata)]


def group_of_call(grouped: Optional[GroupedAttentionMetadata], metadata: Any) -> Optional[int]:
    """Which entry of the grouped batch an attention call was handed (by identity: a layer
    passes its group's entry on as it is); None when the batch is not grouped."""
    if grouped is None:
        return None
    for g, entry in enumerate(grouped):
        if entry is metadata:
            return g
    raise RuntimeError("an attention call got metadata that is no entry of the step's "
                       "GroupedAttentionMetadata; the runner cannot tell its KV-cache group.")


class StaticDecodeInputs:
    """Device buffers a decode graph reads: token ids, positions and attention metadata for
    up to `max_batch` one-token requests, with a block table and slot mapping per KV-cache
    group (`block_tables[g]`, `slot_mappings[g]`). `fill` copies a step in and pads it."""

    def __init__(self, max_batch: int, max_tokens: int, max_blocks: int,
                 device: torch.device, num_groups: int = 1) -> None:
        self.max_blocks = max_blocks
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = [torch.zeros(max_batch, max_blocks, dtype=torch.int32,
                                         device=device) for _ in range(num_groups)]
        self.slot_mappings = [torch.full((max_batch,), -1, dtype=torch.int64, device=device)
                              for _ in range(num_groups)]

    @property
    def block_table(self) -> torch.Tensor:  # group 0's (the only one of most models)
        return self.block_tables[0]

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.slot_mappings[0]

    def common_metadata(self, size: int, max_model_len: int,
                        group: int = 0) -> CommonAttentionMetadata:
        """Metadata of a `size`-request decode batch over views of these buffers (group
        `group`'s table and slots): what a graph of that size is captured with (and then
        replays with, refilled)."""
        qsl_cpu = torch.arange(size + 1, dtype=torch.int32)
        return CommonAttentionMetadata(
            num_reqs=size, num_actual_tokens=size, max_query_len=1,
            max_seq_len=max_model_len,  # fixed, so the launch grid never changes
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=torch.ones(size, dtype=torch.int32),
            num_computed_tokens_cpu=torch.zeros(size, dtype=torch.int32),
            query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_table=self.block_tables[group][:size],
            slot_mapping=self.slot_mappings[group][:size],
        )

    def fill(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
             metadata: Any) -> None:
        """Copy a decode step of n <= size requests in (`metadata` a backend's, or a
        GroupedAttentionMetadata of them); rows n..size-1 become padding requests (seq_len 0:
        attend to nothing; slot -1: write nothing)."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(first_entry(metadata).seq_lens)
        if size > n:
            self.seq_lens[n:size].zero_()
        for g, entry in group_entries(metadata):
            slots = self.slot_mappings[g]
            slots[:n].copy_(entry.slot_mapping[:n])
            table = entry.block_table
            self.block_tables[g][:n, :table.shape[1]].copy_(table)
            if size > n:
                slots[n:size].fill_(-1)


@dataclass
class RecordedAttention:
    """One attention call cut out of a piecewise capture: the buffers its neighbours read
    and write, and what it needs to run eagerly at replay."""

    backend: TritonAttentionBackend
    query: torch.Tensor  # [size, H, D] view of a static buffer the piece before fills
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor  # [size, H, D] view of the static buffer the piece after reads
    kv_cache: torch.Tensor
    scale: float
    group: Optional[int] = None  # the KV-cache group whose entry it reads (None: ungrouped)

    def run(self, num_tokens: int, metadata: Any) -> None:
        if self.group is not None:
            metadata = metadata[self.group]
        out = self.backend.run(self.query[:num_tokens], self.key[:num_tokens],
                               self.value[:num_tokens], self.kv_cache, metadata, self.scale)
        self.output[:num_tokens].copy_(out)


@dataclass
class Piece:
    graph: torch.cuda.CUDAGraph
    attention: Optional[RecordedAttention]  # runs after the graph; None for the last piece


class AttentionBuffers:
    """Static q/k/v/out buffers of `rows` rows, one per (role, shape, dtype), shared by every
    attention call and every captured size (see the module docstring for why that is safe).
    Reserved eagerly (outside any capture, zero-filled) during the warm-up forward."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._buffers: dict[tuple, torch.Tensor] = {}

    def reserve(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        for role, like in (("q", query), ("k", key), ("v", value), ("out", query)):
            index = (role, tuple(like.shape[1:]), like.dtype)
            if index not in self._buffers:
                self._buffers[index] = torch.zeros((self.rows, *like.shape[1:]),
                                                   dtype=like.dtype, device=like.device)

    def view(self, role: str, like: torch.Tensor) -> torch.Tensor:
        """[like.shape[0], ...] rows of the buffer for this role and `like`'s shape."""
        buf = self._buffers.get((role, tuple(like.shape[1:]), like.dtype))
        if buf is None or like.shape[0] > self.rows:
            raise RuntimeError(
                f"no static {role} buffer for {like.shape[0]} rows of {tuple(like.shape[1:])} "
                f"{like.dtype}: the warm-up forward saw other attention shapes than the capture."
            )
        return buf[:like.shape[0]]


class _Splitter:
    """Builds the pieces of one piecewise capture."""

    def __init__(self, pool: Any, buffers: AttentionBuffers) -> None:
        self.pool = pool
        self.buffers = buffers
        self.pieces: list[Piece] = []
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def end(self, attention: Optional[RecordedAttention]) -> None:
        assert self.graph is not None
        graph, self.graph = self.graph, None
        graph.capture_end()
        self.pieces.append(Piece(graph, attention))

    def abort(self) -> None:
        """Close a capture that failed midway (its graph is useless)."""
        if self.graph is not None:
            graph, self.graph = self.graph, None
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # the capture was already invalidated; the original error matters

    def split(self, backend: TritonAttentionBackend, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, kv_cache: torch.Tensor, scale: float,
              group: Optional[int] = None) -> torch.Tensor:
        """Called by the attention layer mid-capture: hand q/k/v over through static
        buffers, close this piece, record the call, open the next piece."""
        static = [self.buffers.view(role, t) for role, t in (("q", query), ("k", key),
                                                              ("v", value))]
        for buf, tensor in zip(static, (query, key, value)):
            buf.copy_(tensor)  # captured in the piece that produced them
        out = self.buffers.view("out", query)
        self.end(RecordedAttention(backend, *static, out, kv_cache, scale, group))
        self.begin()
        return out


class CudaGraphRunner(GraphRunner):
    """See the module docstring. `captured_sizes` lists the decode sizes (requests);
    `piecewise_sizes` the mixed sizes (tokens)."""

    def __init__(self, forward: ModelForward, config: PlatformConfig,
                 attention: Sequence[AttentionBackend] = ()) -> None:
        super().__init__(forward, config, attention)
        self.decode_sizes = decode_sizes(config)
        self.mixed_sizes = mixed_sizes(config)
        self.piecewise_sizes: tuple[int, ...] = ()
        self.max_model_len = config.max_model_len
        self.max_blocks = config.max_blocks_per_req
        self._decode_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pieces: dict[int, list[Piece]] = {}
        self._splitter: Optional[_Splitter] = None
        self._static: Optional[StaticDecodeInputs] = None
        self._output: Optional[torch.Tensor] = None
        self._attn_buffers = AttentionBuffers(self.mixed_sizes[-1])
        self._reserving = False
        self._pool: Any = None
        # While capturing a grouped model: the dummy batch of the forward in flight, and the
        # backend each group's calls went through (learned from the capture itself).
        self._grouped: Optional[GroupedAttentionMetadata] = None
        self._group_backends: dict[int, TritonAttentionBackend] = {}

    # ---- capture ----
    def capture(self, make_batch: DummyBatchFactory) -> None:
        t0 = time.perf_counter()
        ids, positions, dummy = make_batch(1)
        device = ids.device
        max_tokens = max(self.decode_sizes[-1], self.mixed_sizes[-1])
        num_groups = len(dummy) if isinstance(dummy, GroupedAttentionMetadata) else 1
        self._static = StaticDecodeInputs(self.decode_sizes[-1], max_tokens, self.max_blocks,
                                          device, num_groups)
        backends = self._hookable_backends()
        if not backends:
            logger.warning("CUDA graphs: the forward's attention does not go through this "
                           "platform's backends, so nothing is captured; every batch runs "
                           "eagerly.")
            return
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=device)
        torch.cuda.synchronize(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        for backend in backends:
            backend.capture_hook = self._on_attention
        try:
            with torch.cuda.stream(stream):
                capturable = num_groups == 1 or self._learn_groups(ids, positions, dummy)
                for size in reversed(self.mixed_sizes if capturable else ()):
                    self._pieces[size] = self._capture_pieces(size, make_batch)
                for size in reversed(self.decode_sizes if capturable else ()):
                    self._decode_graphs[size] = self._capture_decode(size, make_batch)
        finally:
            for backend in backends:
                backend.capture_hook = None
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        self.captured_sizes = tuple(sorted(self._decode_graphs))
        self.piecewise_sizes = tuple(sorted(self._pieces))
        num_pieces = len(next(iter(self._pieces.values()))) if self._pieces else 0
        logger.info(
            "CUDA graphs captured in %.1f s: decode batches %s; mixed batches %s tokens "
            "(%d pieces each)", time.perf_counter() - t0, _span(self.captured_sizes),
            _span(self.piecewise_sizes), num_pieces,
        )

    def _learn_groups(self, ids: torch.Tensor, positions: torch.Tensor,
                      dummy: GroupedAttentionMetadata) -> bool:
        """One eager forward of a grouped dummy batch, noting which backend serves each
        group (its decode graphs build their static metadata with it). False, with a
        warning, when some group's attention does not go through this platform's backends."""
        self._grouped = dummy
        try:
            self.forward(ids, positions, dummy)
        finally:
            self._grouped = None
        missing = [g for g, _ in group_entries(dummy) if g not in self._group_backends]
        if missing:
            logger.warning("CUDA graphs: the attention of KV-cache groups %s does not go "
                           "through this platform's backends, so nothing is captured; every "
                           "batch runs eagerly.", missing)
            return False
        return True

    def _hookable_backends(self) -> list[TritonAttentionBackend]:
        """The attention backends handed over that this runner can cut a capture at (this
        platform's: they have a `capture_hook`)."""
        return [b for b in self.attention if hasattr(b, "capture_hook")]

    def _on_attention(self, backend: TritonAttentionBackend, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                      metadata: Any, scale: float) -> torch.Tensor:
        """Every attention call while capturing: cut the piecewise capture open there, or
        (in the eager warm-up before it) size the static buffers, then attend."""
        group = group_of_call(self._grouped, metadata)
        if group is not None:
            self._group_backends.setdefault(group, backend)
        if self._splitter is not None:
            return self._splitter.split(backend, query, key, value, kv_cache, scale, group)
        if self._reserving:
            self._attn_buffers.reserve(query, key, value)
        return backend.run(query, key, value, kv_cache, metadata, scale)

    def _output_rows(self, out: torch.Tensor, size: int) -> torch.Tensor:
        """[size, ...] view of the static output buffer (made on first use, eagerly)."""
        if self._output is None:
            assert self._static is not None
            rows = self._static.input_ids.shape[0]
            self._output = torch.zeros((rows, *out.shape[1:]), dtype=out.dtype,
                                       device=out.device)
        return self._output[:size]

    def _capture_decode(self, size: int, make_batch: DummyBatchFactory) -> torch.cuda.CUDAGraph:
        static = self._static
        assert static is not None
        ids, positions, dummy = make_batch(size)
        static.fill(size, ids, positions, dummy)
        metadata = self._static_metadata(size, dummy)
        ids, positions = static.input_ids[:size], static.positions[:size]
        # Eager once first: Triton compiles and cuBLAS picks its kernels outside the capture.
        self._output_rows(self.forward(ids, positions, metadata), size)
        _drain(ids.device)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, self._pool):
            out = self.forward(ids, positions, metadata)
            self._output_rows(out, size).copy_(out)
        return graph

    def _static_metadata(self, size: int, dummy: Any) -> Any:
        """What a decode graph of `size` is captured with: each group's backend metadata
        over the static buffers, grouped as the dummy batch is."""
        static = self._static
        assert static is not None
        if not isinstance(dummy, GroupedAttentionMetadata):
            common = static.common_metadata(size, self.max_model_len)
            return self._hookable_backends()[0].build_metadata(common)
        return GroupedAttentionMetadata(
            None if entry is None else self._group_backends[g].build_metadata(
                static.common_metadata(size, self.max_model_len, g))
            for g, entry in enumerate(dummy))

    def _capture_pieces(self, size: int, make_batch: DummyBatchFactory) -> list[Piece]:
        static = self._static
        assert static is not None
        ids_dummy, positions_dummy, metadata = make_batch(size)
        ids, positions = static.input_ids[:size], static.positions[:size]
        ids.copy_(ids_dummy)
        positions.copy_(positions_dummy)
        # Each attention call is recorded with the group whose entry it was handed.
        self._grouped = metadata if isinstance(metadata, GroupedAttentionMetadata) else None
        self._reserving = True  # eager warm-up; it also sizes the static attention buffers
        try:
            self._output_rows(self.forward(ids, positions, metadata), size)
        finally:
            self._reserving = False
        _drain(ids.device)
        splitter = _Splitter(self._pool, self._attn_buffers)
        self._splitter = splitter
        try:
            splitter.begin()
            out = self.forward(ids, positions, metadata)
            self._output_rows(out, size).copy_(out)
            splitter.end(None)
        except BaseException:
            splitter.abort()
            raise
        finally:
            self._splitter = None
            self._grouped = None
        return splitter.pieces

    # ---- replay ----
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attn_metadata: Any) -> torch.Tensor:
        num_tokens = input_ids.shape[0]
        max_query_len = getattr(first_entry(attn_metadata), "max_query_len", None)
        if max_query_len == 1 and self._decode_graphs:
            size = padded_size(self.captured_sizes, num_tokens)
            if size is not None and all(m.block_table.shape[1] <= self.max_blocks
                                        for _, m in group_entries(attn_metadata)):
                return self._replay_decode(size, input_ids, positions, attn_metadata)
        if self._pieces:
            size = padded_size(self.piecewise_sizes, num_tokens)
            if size is not None:
                return self._replay_pieces(size, input_ids, positions, attn_metadata)
        return self.forward(input_ids, positions, attn_metadata)

    def _replay_decode(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                       attn_metadata: Any) -> torch.Tensor:
        assert self._static is not None and self._output is not None
        self._static.fill(size, input_ids, positions, attn_metadata)
        self._decode_graphs[size].replay()
        return self._output[:input_ids.shape[0]]

    def _replay_pieces(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                       attn_metadata: Any) -> torch.Tensor:
        assert self._static is not None and self._output is not None
        num_tokens = input_ids.shape[0]
        self._static.input_ids[:num_tokens].copy_(input_ids)
        self._static.positions[:num_tokens].copy_(positions)
        for piece in self._pieces[size]:
            piece.graph.replay()
            if piece.attention is not None:
                piece.attention.run(num_tokens, attn_metadata)
        return self._output[:num_tokens]


def _drain(device: torch.device) -> None:
    """Let the eager warm-up finish before a capture starts, as `torch.cuda.graph` does: the
    capture then begins on an idle device, and a warm-up kernel that cannot finish (one
    waiting on a peer GPU that never answers) stops startup here, at the warm-up, rather
    than somewhere inside the capture."""
    torch.cuda.synchronize(device)


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, pool: Any) -> Iterator[None]:
    """Capture into `graph` on the current (side) stream; close the capture on errors."""
    graph.capture_begin(pool=pool)
    try:
        yield
    except BaseException:
        try:
            graph.capture_end()
        except RuntimeError:
            pass  # already invalidated; the original error is the one to see
        raise
    graph.capture_end()


def _span(sizes: Sequence[int]) -> str:
    return f"{sizes[0]}..{sizes[-1]} ({len(sizes)} sizes)" if sizes else "none"
