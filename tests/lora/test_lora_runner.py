"""The model runner with `config.lora` set: requests carry their adapter in NewRequestData,
the runner writes each token's slot every step, and a request whose adapter cannot be read
is reported failed while the rest of the step runs."""

from __future__ import annotations

import dataclasses

import torch

from engine.config import LoRAConfig
from engine.engine_args import EngineArgs
from engine.engine_core.core import resolve_for_platform
from engine.messages.step import CachedRequestData, NewRequestData, SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.worker.model_runner import ModelRunner
from platforms.cpu.platform import CpuPlatform
from tests.lora.conftest import ALL_TARGETS, hf_logits, make_adapter, random_hf_model, request
from tests.lora.conftest import tiny_llama_config as llama

PROMPT = list(range(3, 23))
GREEDY_WITH_PROMPT_LOGPROBS = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0)


def make_runner(base_dir) -> ModelRunner:
    config = EngineArgs(model=str(base_dir), max_model_len=256, block_size=16,
                        num_kv_blocks=16).create_config()
    config = dataclasses.replace(config, lora=LoRAConfig(max_loras=2, max_lora_rank=8))
    platform = CpuPlatform()
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    runner.load_model()
    runner.profile_run()  # the LoRA ops run in it (every slot -1)
    runner.initialize_kv_cache(16)
    runner.warm_up()
    # CPU captures nothing: afterwards the step's host flag decides whether the ops run.
    assert not runner.lora_manager.context.always_apply
    return runner


def new(req_id: str, blocks: list[int], lora=None) -> NewRequestData:
    return NewRequestData(req_id, list(PROMPT), [], GREEDY_WITH_PROMPT_LOGPROBS,
                          block_ids=(blocks,), num_computed_tokens=0, lora_request=lora)


def prompt_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """log p(prompt token p+1 | ..p) under the reference model."""
    logits = hf_logits(reference, torch.tensor(ids))
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_the_runner_runs_each_request_with_its_adapter(base_dir, tmp_path):
    merged = make_adapter(base_dir, tmp_path / "a", r=8, lora_alpha=16,
                          target_modules=ALL_TARGETS)
    base = random_hf_model(llama())
    runner = make_runner(base_dir)
    lora = request(1, tmp_path / "a")
    reqs = [new("lora", [1, 2], lora), new("base", [3, 4]),
            new("broken", [5, 6], request(2, tmp_path / "missing"))]
    out = runner.execute_model(SchedulerOutput(reqs, [], {r.req_id: len(PROMPT) for r in reqs},
                                               3 * len(PROMPT)))
    assert set(out.failed) == {"broken"} and "adapter_config.json" in out.failed["broken"]
    for req_id, reference in (("lora", merged), ("base", base)):
        got = torch.tensor([e.logprobs[0] for e in out.prompt_logprobs[req_id]])
        torch.testing.assert_close(got, prompt_logprobs(reference, PROMPT),
                                   rtol=1e-4, atol=1e-4)
    # A decode step: the sampled tokens are the references' greedy choices.
    sampled = dict(zip(out.req_ids, out.sampled_token_ids))
    assert sampled["lora"][0] == int(hf_logits(merged, torch.tensor(PROMPT))[-1].argmax())
    assert sampled["base"][0] == int(hf_logits(base, torch.tensor(PROMPT))[-1].argmax())
    step = SchedulerOutput(
        [], [CachedRequestData(r, [], len(PROMPT), sampled[r]) for r in ("lora", "base")],
        {"lora": 1, "base": 1}, 2, finished_req_ids={"broken"})
    out = runner.execute_model(step)
    decoded = dict(zip(out.req_ids, out.sampled_token_ids))
    for req_id, reference in (("lora", merged), ("base", base)):
        ids = torch.tensor(PROMPT + sampled[req_id])
        assert decoded[req_id][0] == int(hf_logits(reference, ids)[-1].argmax())
    assert runner.lora_manager.device_ids == [1]


def test_a_runner_without_lora_binds_nothing(base_dir):
    config = EngineArgs(model=str(base_dir), max_model_len=256, block_size=16,
                        num_kv_blocks=16).create_config()
    platform = CpuPlatform()
    runner = ModelRunner(resolve_for_platform(config, platform), platform)
    runner.load_model()
    assert runner.lora_manager is None
