"""Chained hashes of full KV-cache blocks, the keys of prefix caching.

Rule: a block's hash covers everything its KV depends on: the hash of the block before it
(hence the whole prefix), its own token ids and the request's extra keys (cache salt, LoRA
id, ...). Only full blocks are hashed; a partial block's contents are still changing.

Why sha256 rather than Python's `hash()`: a hit reuses another request's KV, so a collision
would silently corrupt an answer (or leak one tenant's prompt to another), and collisions of
`hash()` over int tuples are easy to construct on purpose. sha256 over a msgpack encoding
costs about a microsecond per block of 16 tokens, which is noise next to a forward pass, and
is stable across processes and runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Optional

import msgspec

BlockHash = bytes  # 32-byte sha256 digest

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(
    parent_hash: Optional[BlockHash],
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] = (),
) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    payload = _encoder.encode((parent_hash or b"", list(token_ids), list(extra_keys)))
    return hashlib.sha256(payload).digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[Any, ...] = (),
) -> list[BlockHash]:
    """Append to `block_hashes` the hashes of full blocks of `token_ids` not hashed yet.

    Incremental: only blocks that became full since the last call are hashed, so calling this
    every step as a sequence grows costs O(new blocks).
    """
    num_full_blocks = len(token_ids) // block_size
    for i in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[i - 1] if i > 0 else None
        block_tokens = token_ids[i * block_size : (i + 1) * block_size]
        block_hashes.append(hash_block_tokens(parent, block_tokens, extra_keys))
    return block_hashes
