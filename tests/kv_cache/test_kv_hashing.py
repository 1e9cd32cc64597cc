"""Chained block hashes: same prefix -> same hashes; anything in the chain differs -> differ."""

from engine.kv_cache.hashing import extend_block_hashes, hash_block_tokens


def test_same_tokens_same_chain():
    tokens = list(range(40))
    a = extend_block_hashes([], tokens, block_size=16)
    b = extend_block_hashes([], tokens, block_size=16)
    assert len(a) == 2  # only full blocks are hashed
    assert a == b
    assert all(isinstance(h, bytes) and len(h) == 32 for h in a)


def test_hash_depends_on_parent():
    block = list(range(16))
    assert hash_block_tokens(None, block) != hash_block_tokens(b"x" * 32, block)
    # Same second block after different first blocks -> different second hash.
    a = extend_block_hashes([], [1] * 16 + block, 16)
    b = extend_block_hashes([], [2] * 16 + block, 16)
    assert a[1] != b[1]


def test_extra_keys_change_hashes():
    tokens = list(range(32))
    plain = extend_block_hashes([], tokens, 16)
    salted = extend_block_hashes([], tokens, 16, extra_keys=("salt",))
    lora = extend_block_hashes([], tokens, 16, extra_keys=(7,))
    assert plain[0] != salted[0] != lora[0]
    assert plain[1] != salted[1]


def test_incremental_equals_one_shot():
    tokens = list(range(100))
    hashes: list[bytes] = []
    for end in range(1, 101, 7):
        extend_block_hashes(hashes, tokens[:end], 8)
    extend_block_hashes(hashes, tokens, 8)
    assert hashes == extend_block_hashes([], tokens, 8)
    assert len(hashes) == 12
