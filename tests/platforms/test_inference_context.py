"""`Capabilities.inference_mode`: the no-grad mode the model runner steps under. The default
is `torch.inference_mode()`; a platform that sets it False (torch_xla needs it) gets every
step, warm-up and capture run under `torch.no_grad()` (sampling included) and generates
normally."""

from __future__ import annotations

import dataclasses

import torch

from engine import LLM, SamplingParams
from engine.worker.model_runner import step_grad_mode
from platforms import registry
from platforms.cpu.platform import CpuPlatform
from platforms.hookspecs import hookimpl
from platforms.interface import GraphRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
PROMPTS = ["The capital of France is", "1, 2, 3,"]


class _RecordingRunner(GraphRunner):
    """Eager runner noting the grad/inference mode of every capture and step."""

    modes: list[tuple[str, bool, bool]] = []

    def capture(self, make_batch) -> None:
        self.modes.append(("capture", torch.is_inference_mode_enabled(),
                           torch.is_grad_enabled()))

    def __call__(self, input_ids, positions, attn_metadata):
        self.modes.append(("step", torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return super().__call__(input_ids, positions, attn_metadata)


class NoGradCpuPlatform(CpuPlatform):
    name = "nograd_cpu"
    priority = -1  # never chosen unless asked for

    capabilities = dataclasses.replace(CpuPlatform.capabilities, inference_mode=False)

    def graph_runner(self, forward, config, attention=()):
        return _RecordingRunner(forward, config, attention)


class _Plugin:
    @hookimpl
    def engine_platforms(self):
        return [NoGradCpuPlatform]


def _generate(model: str, device: str) -> list[list[int]]:
    llm = LLM(model=model, device=device, num_kv_blocks=32)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_default_is_inference_mode():
    with step_grad_mode(CpuPlatform()):
        assert torch.is_inference_mode_enabled()
    with step_grad_mode(NoGradCpuPlatform()):
        assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()


def test_a_platform_choosing_no_grad_steps_under_it(smollm2):
    registry.reset_registry()
    try:
        registry.get_registry().register_plugin(_Plugin(), "nograd-test")
        _RecordingRunner.modes.clear()
        tokens = _generate(smollm2, "nograd_cpu")
        modes = list(_RecordingRunner.modes)
    finally:
        registry.reset_registry()
    assert ("capture", False, False) in modes
    steps = [m for m in modes if m[0] == "step"]
    assert len(steps) >= 1 + GREEDY.max_tokens  # warm-up + prefill + decodes
    assert all(m == ("step", False, False) for m in steps), modes
    assert [len(t) for t in tokens] == [GREEDY.max_tokens] * len(PROMPTS)
