"""The Spyre platform against the conformance kit (CPU stand-in), plus detection, validation,
static-shape attention padding, and what needs the card (skipped here, with the reason)."""

from __future__ import annotations

import pytest
import torch
from engine_spyre import platform as spyre
from spyre_testutil import simulate

from platforms.interface import AttentionSpec, CommonAttentionMetadata
from platforms.static_attention import StepShape, build_static_metadata
from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    check_device,
    check_memory_info,
)

needs_card = pytest.mark.skipif(
    not spyre.hardware_present(),
    reason="needs a Spyre card and torch_sendnn (the sendnn compile backend); only the "
    "CPU stand-in runs here",
)


@pytest.fixture
def platform(monkeypatch):
    simulate(monkeypatch)
    return spyre.SpyrePlatform()


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_attention_matches_the_reference(platform, case):
    check_attention_against_reference(platform, case)


def test_attention_float16(platform):
    check_attention_against_reference(platform, ATTENTION_CASES[2], dtype=torch.float16)


def test_device_and_memory(platform):
    check_device(platform)
    check_memory_info(platform)


def _step(block_size=4):
    # Two requests: a 5-token chunk over 3 cached tokens, and a decode at position 9.
    qsl = torch.tensor([0, 5, 6], dtype=torch.int32)
    seq = torch.tensor([8, 10], dtype=torch.int32)
    computed = torch.tensor([3, 9], dtype=torch.int32)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    slots = []
    for r, (c, n) in enumerate([(3, 5), (9, 1)]):
        for p in range(c, c + n):
            slots.append(int(table[r, p // block_size]) * block_size + p % block_size)
    return CommonAttentionMetadata(
        num_reqs=2, num_actual_tokens=6, max_query_len=5, max_seq_len=10,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq, num_computed_tokens_cpu=computed,
        query_start_loc=qsl, seq_lens=seq, block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64))


def test_padding_to_a_larger_shape_changes_no_real_row(platform):
    spec = AttentionSpec(4, 2, 8, torch.float32, 4)
    backend = platform.attention_backend(spec)
    gen = torch.Generator().manual_seed(0)
    common = _step()
    q, k, v = (torch.randn(6, h, 8, generator=gen) for h in (4, 2, 2))
    cache = torch.randn(backend.kv_cache_shape(8), generator=gen)
    natural = backend.build_metadata(common)
    assert natural.shape == StepShape(2, 5, 3)
    padded = natural.padded(StepShape(4, 8, 5))
    cache_a, cache_b = cache.clone(), cache.clone()
    out_a = backend.forward(q, k, v, cache_a, natural, 0.3)
    pad = padded.shape.num_tokens - 6
    qp, kp, vp = (torch.cat([t, torch.randn(pad, *t.shape[1:], generator=gen)])
                  for t in (q, k, v))
    out_b = backend.forward(qp, kp, vp, cache_b, padded, 0.3)
    torch.testing.assert_close(out_b[:6], out_a)
    assert torch.isfinite(out_b).all()
    # Padding rows wrote only the scratch slot: the cache past it is identical.
    assert torch.equal(cache_a[:, 1:], cache_b[:, 1:])


def test_metadata_refuses_a_shape_too_small():
    with pytest.raises(ValueError, match="does not fit"):
        build_static_metadata(_step(), StepShape(2, 4, 3), 8, 4, torch.float32)


def test_not_available_without_card_or_simulation(monkeypatch):
    monkeypatch.delenv(spyre.SIMULATE_ENV, raising=False)
    assert spyre.SpyrePlatform.is_available() == spyre.hardware_present()
    monkeypatch.setenv(spyre.SIMULATE_ENV, "0")
    assert spyre.SpyrePlatform.is_available() == spyre.hardware_present()


def test_card_detection_reads_pci_vendor_and_class(tmp_path):
    for addr, vendor, cls in [("0000:01:00.0", "0x1014", "0x120000"),  # IBM accelerator
                              ("0000:02:00.0", "0x10de", "0x030200"),  # a GPU
                              ("0000:03:00.0", "0x1014", "0x010400")]:  # IBM storage
        dev = tmp_path / addr
        dev.mkdir()
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "class").write_text(cls + "\n")
    assert spyre.spyre_cards(str(tmp_path)) == ["0000:01:00.0"]


def test_validate_names_each_problem_and_its_flag(platform, monkeypatch):
    from platforms.testing import make_platform_config

    config = make_platform_config(dtype=torch.float32, max_model_len=70,
                                  max_num_batched_tokens=100)
    problems = platform.validate(config)
    assert any("reaches 80" in p and "max_model_len=70" in p for p in problems)
    assert any("max_num_batched_tokens=100" in p for p in problems)
    monkeypatch.setenv("ENGINE_SPYRE_WARMUP_SHAPES", "2x65x16")
    assert any("not a multiple of 64" in p for p in platform.validate(config))
    monkeypatch.setenv("ENGINE_SPYRE_COMPILE_BACKEND", "sendnn")
    assert any("cannot run without the card" in p for p in platform.validate(config))
    monkeypatch.delenv(spyre.SIMULATE_ENV)
    assert any("float16" in p for p in platform.validate(config))


def test_describe_shows_mode_and_shapes(platform):
    info = platform.describe()
    assert info["mode"] == "simulated on CPU"
    assert info["warmup_shapes"] == "2x64x16"
    assert "torch.compile per warm-up shape" in info["graph_capture"]


@needs_card
def test_sendnn_backend_runs_a_static_attention_step_on_the_card():
    import torch_sendnn  # noqa: F401

    backend = spyre.SpyrePlatform().attention_backend(AttentionSpec(4, 2, 8, torch.float16, 4))
    common = _step()
    md = backend.build_metadata(common)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, h, 8, generator=gen).half() for h in (4, 2, 2))
    cache = torch.zeros(backend.kv_cache_shape(8), dtype=torch.float16)
    expected = backend.forward(q, k, v, cache.clone(), md, 0.3)
    compiled = torch.compile(backend.forward, backend=spyre.HARDWARE_BACKEND, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, cache, md, 0.3), expected, atol=2e-2, rtol=0)
