"""KV-cache manager: which blocks each request holds, and prefix-cache lookups.

Rule: a request holds one block list per KV-cache group (see `engine.kv_cache.groups`), and
list g covers its first `num_computed_tokens` (+ the tokens scheduled this step) in order.
A group with a sliding window W keeps only the blocks its window still reaches: a block that
lies wholly before position `num_computed_tokens - W + 1` (the first key the step's earliest
query attends) is given back, and its place in the list is None (the worker's table keeps a
stale id there, which the attention backends never read). `allocate_slots` either allocates
everything a step needs or leaves the held blocks as they were (blocks that fell out of a
window are given back in both cases). Full blocks are hashed and cached as soon as the
tokens filling them are known, whether those tokens came from the prompt or were generated,
so any later request sharing the prefix hits, group by group. The manager never blocks the
whole prompt: at least its last token is always computed, since the model must run on it to
produce the next token's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

from engine.kv_cache.block import KVCacheBlock
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hashing import BlockHash, extend_block_hashes
from platforms.util import cdiv

# Per group: the request's blocks in order, None where a window group gave one back.
GroupBlocks = list[Optional[KVCacheBlock]]


class CacheableRequest(Protocol):
    """What the manager reads of a request (the scheduler's `Request` satisfies it)."""

    request_id: str
    num_computed_tokens: int
    block_hashes: list[BlockHash]
    extra_keys: tuple[Any, ...]

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def num_tokens(self) -> int: ...


class KVCacheManager:
    """Block bookkeeping for all requests over one `BlockPool` (no block is reserved).

    `windows`: one entry per KV-cache group, its sliding window (None: full attention).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 windows: Sequence[Optional[int]] = (None,)) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}; set --block-size.")
        if not windows:
            raise ValueError("A KV cache needs at least one group.")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.windows = tuple(windows)
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, tuple[GroupBlocks, ...]] = {}
        # Per request and group: how many leading blocks are already hashed into the cache.
        self._num_cached_blocks: dict[str, list[int]] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache since take_stats()
        self.hits = 0  # of those, tokens found

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def max_blocks_needed(self, num_tokens: int, max_step_tokens: Optional[int] = None) -> int:
        """The most blocks a request of `num_tokens` holds at once, computed in steps of at
        most `max_step_tokens` (None: all at once): every block in a full group; in a
        window group those the window reaches back from a step plus the step's own."""
        full = cdiv(num_tokens, self.block_size)
        step = num_tokens if max_step_tokens is None else min(max_step_tokens, num_tokens)
        return sum(full if w is None else min(full, cdiv(w - 1 + step, self.block_size) + 1)
                   for w in self.windows)

    def _update_hashes(self, request: CacheableRequest) -> list[BlockHash]:
        return extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.extra_keys
        )

    def _key(self, group: int, block_hash: BlockHash) -> BlockHash:
        """The cache key of a block of `group`: the same tokens hold other K/V per group."""
        return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")

    def _first_kept_block(self, group: int, num_computed: int) -> int:
        """Index of the first block group `group` must keep for queries from position
        `num_computed` on (0 for full attention)."""
        window = self.windows[group]
        if window is None:
            return 0
        return max(0, num_computed - window + 1) // self.block_size

    def get_computed_blocks(self, request: CacheableRequest
                            ) -> tuple[tuple[GroupBlocks, ...], int]:
        """Longest cached prefix of a new request: (per group, the blocks it keeps of that
        prefix; the number of tokens the prefix holds).

        A full-attention group needs every block of the prefix, a window group only those
        its window reaches from the prefix's end. Capped at `(num_tokens - 1) // block_size`
        blocks so the last token is computed. Takes no reference: pass the blocks to
        `allocate_slots`, which does.
        """
        empty: tuple[GroupBlocks, ...] = tuple([] for _ in self.windows)
        if not self.enable_caching:
            return empty, 0
        block_hashes = self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = [self._lookup(g, block_hashes[:max_blocks]) for g in range(self.num_groups)]
        num_hit = max_blocks
        for g, blocks in enumerate(found):
            if self.windows[g] is None:  # a full group's hit is its leading run
                run = next((i for i, b in enumerate(blocks) if b is None), len(blocks))
                num_hit = min(num_hit, run)
        # A window group needs the blocks its window reaches from the hit's end: lower the
        # hit until every window group has them (runs[L]: cached blocks ending at L - 1).
        runs = [_runs(blocks) for g, blocks in enumerate(found) if self.windows[g] is not None]
        window_groups = [g for g in range(self.num_groups) if self.windows[g] is not None]
        while num_hit > 0 and not all(
            run[num_hit] >= num_hit - self._first_kept_block(g, num_hit * self.block_size)
            for g, run in zip(window_groups, runs)
        ):
            num_hit -= 1
        hits = []
        for g, blocks in enumerate(found):
            first = self._first_kept_block(g, num_hit * self.block_size)
            hits.append([None] * first + blocks[first:num_hit])
        return tuple(hits), num_hit * self.block_size

    def _lookup(self, group: int, block_hashes: list[BlockHash]) -> GroupBlocks:
        get = self.pool.get_cached_block
        return [get(self._key(group, h)) for h in block_hashes]

    def allocate_slots(
        self,
        request: CacheableRequest,
        num_new_tokens: int,
        new_computed_blocks: Optional[tuple[GroupBlocks, ...]] = None,
    ) -> Optional[tuple[list[KVCacheBlock], ...]]:
        """Blocks for `num_new_tokens` more tokens after the computed ones (and the hits).

        Returns, per group, the newly allocated blocks (not the hits), or None, with no
        block allocated, when too few are free. Prefix-cache stats are counted here, when a
        request is admitted, so a request that waits for blocks is not counted again every
        step.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be at least 1, got {num_new_tokens}.")
        hits = new_computed_blocks or tuple([] for _ in self.windows)
        req_blocks = self.req_to_blocks.get(request.request_id)
        is_admission = req_blocks is None
        num_hit_blocks = len(hits[0])
        num_computed = request.num_computed_tokens + num_hit_blocks * self.block_size
        if req_blocks is not None:
            self._free_out_of_window(req_blocks, num_computed)
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = [
            max(num_required - (len(req_blocks[g]) if req_blocks else 0) - len(hits[g]), 0)
            for g in range(self.num_groups)
        ]
        # Hits sitting in the free queue count against the free blocks once touched.
        num_free_hits = sum(1 for group in hits for b in group if b is not None and b.ref_cnt == 0)
        if sum(num_new_blocks) > self.pool.num_free_blocks - num_free_hits:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks.setdefault(
                request.request_id, tuple([] for _ in self.windows))
            self._num_cached_blocks[request.request_id] = [0] * self.num_groups
        new_blocks = []
        for g in range(self.num_groups):
            self.pool.touch(b for b in hits[g] if b is not None)
            req_blocks[g].extend(hits[g])
            blocks = self.pool.get_new_blocks(num_new_blocks[g])
            req_blocks[g].extend(blocks)
            new_blocks.append(blocks)
        if is_admission and self.enable_caching:
            self.queries += request.num_tokens
            self.hits += num_hit_blocks * self.block_size
        self._cache_full_blocks(request, min(num_computed + num_new_tokens, request.num_tokens))
        return tuple(new_blocks)

    def _free_out_of_window(self, req_blocks: tuple[GroupBlocks, ...], num_computed: int
                            ) -> None:
        """Give back the blocks no query from `num_computed` on reaches (window groups)."""
        for g, blocks in enumerate(req_blocks):
            first = min(self._first_kept_block(g, num_computed), len(blocks))
            # Blocks before `first` are given back in order, so the list's None prefix
            # grows from the left; scan back from `first` to the last one still held.
            i = first - 1
            freed = []
            while i >= 0 and blocks[i] is not None:
                freed.append(blocks[i])
                blocks[i] = None
                i -= 1
            if freed:
                self.pool.free_blocks(reversed(freed))

    def _cache_full_blocks(self, request: CacheableRequest, num_known_tokens: int) -> None:
        """Register every block now full of known tokens; their KV is written this step."""
        if not self.enable_caching:
            return
        req_id = request.request_id
        num_full = num_known_tokens // self.block_size
        cached = self._num_cached_blocks[req_id]
        if num_full <= min(cached):
            return
        block_hashes = self._update_hashes(request)
        for g, blocks in enumerate(self.req_to_blocks[req_id]):
            for i in range(cached[g], num_full):
                block = blocks[i]
                if block is not None:
                    self.pool.cache_full_block(block, self._key(g, block_hashes[i]))
            cached[g] = max(cached[g], num_full)

    def free(self, request: CacheableRequest) -> None:
        """Release a request's blocks, tail first, so its tail is evicted before its prefix
        (the prefix is the part other requests are likeliest to share)."""
        groups = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        for blocks in groups or ():
            self.pool.free_blocks(b for b in reversed(blocks) if b is not None)

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """Per group, the block ids of the request's table; 0 where a window group gave a
        block back (never read: see the module rule)."""
        groups = self.req_to_blocks.get(request_id)
        if groups is None:
            return tuple([] for _ in self.windows)
        return tuple([0 if b is None else b.block_id for b in blocks] for blocks in groups)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds now, over all groups."""
        groups = self.req_to_blocks.get(request_id, ())
        return sum(1 for blocks in groups for b in blocks if b is not None)

    def take_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens since the last call; resets both."""
        stats = (self.queries, self.hits)
        self.queries = self.hits = 0
        return stats

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; False (nothing done) while any request holds blocks."""
        return self.pool.reset_prefix_cache()


def _runs(blocks: GroupBlocks) -> list[int]:
    """runs[L]: how many blocks before index L are cached in a row (runs[0] = 0)."""
    runs = [0]
    for block in blocks:
        runs.append(runs[-1] + 1 if block is not None else 0)
    return runs
