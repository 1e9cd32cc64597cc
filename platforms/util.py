"""Small integer helpers shared by the core, the contract and the plugins (torch-free)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """a / b rounded up, for non-negative a and positive b (blocks for a token count)."""
    return -(a // -b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `a`."""
    return cdiv(a, multiple) * multiple
