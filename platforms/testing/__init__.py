"""Conformance kit: checks any platform plugin runs against itself from its own tests.

Rule: each check takes a `Platform` instance, uses only the public contract, and raises
AssertionError with the numbers on a failure, so it drops into any pytest test:

    from platforms.testing import ATTENTION_CASES, check_attention_against_reference

    @pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
    def test_attention(case):
        check_attention_against_reference(MyPlatform(), case)
"""

from platforms.testing.attention import (
    ATTENTION_CASES,
    DEFAULT_REQUESTS,
    AttentionCase,
    check_attention_against_reference,
)
from platforms.testing.device import check_device, check_memory_info

__all__ = [
    "ATTENTION_CASES",
    "DEFAULT_REQUESTS",
    "AttentionCase",
    "check_attention_against_reference",
    "check_device",
    "check_memory_info",
]
