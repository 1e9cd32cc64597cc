"""The CPU backend's sliding window and logits soft-cap pass the conformance kit on every path
(native float32 decode, torch decode, bfloat16), and the kit fails backends that ignore the
window or read the stale blocks before it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from platforms.cpu.attention import CpuAttentionBackend
from platforms.cpu.platform import CpuPlatform
from platforms.interface import ATTENTION_FEATURES, AttentionSpec, Capabilities
from platforms.testing import (
    ATTENTION_CASES,
    FEATURE_CASES,
    check_attention_against_reference,
    check_attention_features,
    supported_feature_cases,
)


class TorchOnlyBackend(CpuAttentionBackend):
    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self.native = None  # the padded-SDPA / matmul decode path


class TorchOnlyCpuPlatform(CpuPlatform):
    name = "cpu-torch-only"

    def attention_backend(self, spec: AttentionSpec) -> CpuAttentionBackend:
        return TorchOnlyBackend(spec)


def test_cpu_lists_every_attention_feature():
    assert CpuPlatform.capabilities.attention_features == frozenset(ATTENTION_FEATURES)
    assert supported_feature_cases(CpuPlatform()) == FEATURE_CASES


@pytest.mark.parametrize("platform", [CpuPlatform(), TorchOnlyCpuPlatform()],
                         ids=["native", "torch"])
@pytest.mark.parametrize("feature_case", FEATURE_CASES, ids=lambda c: c.id)
def test_cpu_window_and_soft_cap_match_reference(platform, feature_case):
    for case in ATTENTION_CASES:
        assert check_attention_features(platform, case, feature_case) < 1e-4


@pytest.mark.parametrize("feature_case", FEATURE_CASES[:3], ids=lambda c: c.id)
def test_cpu_window_and_soft_cap_bfloat16(feature_case):
    err = check_attention_features(CpuPlatform(), ATTENTION_CASES[3], feature_case,
                                   dtype=torch.bfloat16)
    assert err < 3e-2


@pytest.mark.parametrize("seed", [1, 2])
def test_cpu_window_on_fresh_inputs(seed):
    check_attention_features(CpuPlatform(), ATTENTION_CASES[5], FEATURE_CASES[2], seed=seed)


class IgnoresWindowBackend(CpuAttentionBackend):
    """Wrong on purpose: full causal attention whatever the spec says."""

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(dataclasses.replace(spec, sliding_window=None))


class MasksStaleBlocksBackend(CpuAttentionBackend):
    """Wrong on purpose: gathers a chunk's context from block 0 and masks the keys before the
    window out (right numbers on a clean cache, NaN once those blocks were reused)."""

    def _first_key(self, first_query_pos: int) -> int:
        return 0


class _Broken(CpuPlatform):
    backend_class = CpuAttentionBackend

    def attention_backend(self, spec: AttentionSpec) -> CpuAttentionBackend:
        return self.backend_class(spec)


class IgnoresWindowPlatform(_Broken):
    name = "ignores-window"
    backend_class = IgnoresWindowBackend


class MasksStalePlatform(_Broken):
    name = "masks-stale"
    backend_class = MasksStaleBlocksBackend


class NoFeaturesPlatform(CpuPlatform):
    name = "no-features"
    capabilities = dataclasses.replace(CpuPlatform.capabilities,
                                       attention_features=frozenset())


def test_kit_fails_a_backend_that_ignores_the_window():
    with pytest.raises(AssertionError, match="window 24"):
        check_attention_features(IgnoresWindowPlatform(), ATTENTION_CASES[0], FEATURE_CASES[0])


def test_kit_fails_a_backend_that_reads_stale_blocks_even_masked():
    with pytest.raises(AssertionError, match="max abs error nan"):
        check_attention_features(MasksStalePlatform(), ATTENTION_CASES[0], FEATURE_CASES[0])


def test_kit_checks_only_listed_features():
    assert supported_feature_cases(NoFeaturesPlatform()) == ()
    with pytest.raises(ValueError, match="sliding_window"):
        check_attention_against_reference(NoFeaturesPlatform(), ATTENTION_CASES[0],
                                          sliding_window=8)
    assert isinstance(NoFeaturesPlatform.capabilities, Capabilities)


def test_soft_cap_changes_the_result():
    """The soft-cap cases are not vacuous: a cap of 5 on these scores is far from no cap."""
    class NoCapBackend(CpuAttentionBackend):
        def __init__(self, spec):
            super().__init__(dataclasses.replace(spec, logits_soft_cap=None))

    class NoCapPlatform(_Broken):
        name = "no-cap"
        backend_class = NoCapBackend

    with pytest.raises(AssertionError, match="soft-cap 5.0"):
        check_attention_features(NoCapPlatform(), ATTENTION_CASES[0], FEATURE_CASES[1])
