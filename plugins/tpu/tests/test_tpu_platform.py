"""The TPU platform: selection without torch_xla or a TPU, validation, description, and the
conformance kit on XLA's CPU device where torch_xla is installed (nox -s tpu)."""

import importlib.util

import pytest
import torch
from engine_tpu import platform as tpu

from platforms.testing import (
    ATTENTION_CASES,
    check_attention_against_reference,
    make_platform_config,
)

needs_xla = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None,
    reason="torch_xla is not installed here (it pins torch 2.9.0); `nox -s tpu` runs these "
    "on XLA's CPU device",
)


@pytest.fixture
def xla_cpu(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv(tpu.ALLOW_CPU_ENV, "1")
    return tpu.TpuPlatform()


def test_not_available_without_torch_xla_or_a_tpu(monkeypatch):
    monkeypatch.delenv(tpu.ALLOW_CPU_ENV, raising=False)
    expected = importlib.util.find_spec("torch_xla") is not None and bool(tpu.tpu_chips())
    assert tpu.TpuPlatform.is_available() == expected


def test_chip_detection_reads_the_google_pci_vendor(tmp_path):
    for addr, vendor in [("0000:00:04.0", "0x1ae0"), ("0000:00:05.0", "0x8086")]:
        (tmp_path / addr).mkdir()
        (tmp_path / addr / "vendor").write_text(vendor + "\n")
    assert tpu.tpu_chips(str(tmp_path)) == ["0000:00:04.0"]


def test_validate_bounds_the_number_of_programs():
    config = make_platform_config(dtype=torch.bfloat16, max_num_seqs=1024,
                                  max_num_batched_tokens=65536, max_model_len=131072,
                                  block_size=16)
    problems = tpu.TpuPlatform().validate(config)
    assert any("shape buckets could be compiled" in p and "--max-num-seqs" in p
               for p in problems)


def test_describe_is_cheap_and_names_the_capture_strategy():
    info = tpu.TpuPlatform().describe()
    assert info["device_type"] == "xla" and info["collectives"] == "xla"
    assert "padded bucket" in info["graph_capture"]


@needs_xla
@pytest.mark.parametrize("case", ATTENTION_CASES[:3], ids=lambda c: c.id)
def test_attention_on_the_xla_cpu_device(xla_cpu, case):
    assert xla_cpu.device().type == "xla"
    check_attention_against_reference(xla_cpu, case)
