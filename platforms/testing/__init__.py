"""Conformance kit: checks any platform plugin runs against itself from its own tests.

Rule: each check takes a `Platform` instance, uses only the public contract (nothing of the
engine: `platforms` is all it imports), and raises
AssertionError with the numbers on a failure, so it drops into any pytest test:

    from platforms.testing import ATTENTION_CASES, check_attention_against_reference

    @pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
    def test_attention(case):
        check_attention_against_reference(MyPlatform(), case)
"""

from platforms.testing.attention import (
    ATTENTION_CASES,
    DEFAULT_REQUESTS,
    FEATURE_CASES,
    AttentionCase,
    AttentionFeatureCase,
    check_attention_against_reference,
    check_attention_features,
    supported_feature_cases,
)
from platforms.testing.communicator import check_communicator
from platforms.testing.contract import check_contract
from platforms.testing.device import check_device, check_events, check_memory_info
from platforms.testing.graph import (
    DEFAULT_BATCHES,
    check_graph_runner,
    make_platform_config,
    write_tiny_llama,
)
from platforms.testing.install import install_plugin_into_fresh_env
from platforms.testing.kernels import check_kernel_overrides

__all__ = [
    "ATTENTION_CASES",
    "DEFAULT_REQUESTS",
    "AttentionCase",
    "AttentionFeatureCase",
    "FEATURE_CASES",
    "check_attention_against_reference",
    "check_attention_features",
    "supported_feature_cases",
    "DEFAULT_BATCHES",
    "check_communicator",
    "check_contract",
    "check_device",
    "check_events",
    "check_graph_runner",
    "check_kernel_overrides",
    "check_memory_info",
    "install_plugin_into_fresh_env",
    "make_platform_config",
    "write_tiny_llama",
]
