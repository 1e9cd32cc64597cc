"""KV-cache manager: which blocks each request holds, and prefix-cache lookups.

Rule: a request's blocks cover its first `num_computed_tokens` (+ the tokens scheduled this
step) in order. `allocate_slots` either allocates everything a step needs or changes nothing.
Full blocks are hashed and cached as soon as the tokens filling them are known, whether those
tokens came from the prompt or were generated, so any later request sharing the prefix hits.
The manager never blocks the whole prompt: at least its last token is always computed, since
the model must run on it to produce the next token's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

from engine.kv_cache.block import KVCacheBlock
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hashing import BlockHash, extend_block_hashes
from platforms.util import cdiv


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
    """Block bookkeeping for all requests over one `BlockPool` (no block is reserved)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}; set --block-size.")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are already hashed into the cache map.
        self._num_cached_blocks: dict[str, int] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache since take_stats()
        self.hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _update_hashes(self, request: CacheableRequest) -> list[BlockHash]:
        return extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.extra_keys
        )

    def get_computed_blocks(self, request: CacheableRequest) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a new request, as (blocks, number of tokens they hold).

        Capped at `(num_tokens - 1) // block_size` blocks so the last token is computed. Takes
        no reference: pass the blocks to `allocate_slots`, which does.
        """
        if not self.enable_caching:
            return [], 0
        block_hashes = self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: CacheableRequest,
        num_new_tokens: int,
        new_computed_blocks: Optional[list[KVCacheBlock]] = None,
    ) -> Optional[list[KVCacheBlock]]:
        """Blocks for `num_new_tokens` more tokens after the computed ones (and the hits).

        Returns the newly allocated blocks (not the hits), or None, with no state changed,
        when too few blocks are free. Prefix-cache stats are counted here, when a request is
        admitted, so a request that waits for blocks is not counted again every step.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be at least 1, got {num_new_tokens}.")
        hits = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request.request_id)
        is_admission = req_blocks is None
        num_held = len(req_blocks) if req_blocks is not None else 0
        num_tokens_after = (
            request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        )
        num_required = cdiv(num_tokens_after, self.block_size)
        num_new_blocks = max(num_required - num_held - len(hits), 0)
        # Hits sitting in the free queue count against the free blocks once touched.
        num_free_hits = sum(1 for block in hits if block.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
            self._num_cached_blocks[request.request_id] = 0
        self.pool.touch(hits)
        req_blocks.extend(hits)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        if is_admission and self.enable_caching:
            self.queries += request.num_tokens
            self.hits += len(hits) * self.block_size
        self._cache_full_blocks(request, min(num_tokens_after, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(self, request: CacheableRequest, num_known_tokens: int) -> None:
        """Register every block now full of known tokens; their KV is written this step."""
        if not self.enable_caching:
            return
        req_id = request.request_id
        num_full = num_known_tokens // self.block_size
        start = self._num_cached_blocks[req_id]
        if num_full <= start:
            return
        block_hashes = self._update_hashes(request)
        blocks = self.req_to_blocks[req_id]
        for i in range(start, num_full):
            self.pool.cache_full_block(blocks[i], block_hashes[i])
        self._num_cached_blocks[req_id] = num_full

    def free(self, request: CacheableRequest) -> None:
        """Release a request's blocks, tail first, so its tail is evicted before its prefix
        (the prefix is the part other requests are likeliest to share)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, [])]

    def take_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens since the last call; resets both."""
        stats = (self.queries, self.hits)
        self.queries = self.hits = 0
        return stats

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; False (nothing done) while any request holds blocks."""
        return self.pool.reset_prefix_cache()
