"""The scheduler owns a request's progress; the model runner applies what each scheduler
output says and keeps no count of its own.

Driven on a real ModelRunner (a tiny random-weight Llama on the CPU platform) with
hand-written scheduler outputs: a step's result is a plain message that leaves the runner's
state alone; the token values the runner computes on are the ones the scheduler sent; a
step that starts earlier than the last one ended (rejected tokens rolled back) recomputes
from there; a placeholder position takes its value from the runner's last step.
"""

from __future__ import annotations

import pytest
import torch

from engine.engine_args import EngineArgs
from engine.engine_core.core import resolve_for_platform
from engine.messages.step import CachedRequestData, NewRequestData, SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.worker.model_runner import ModelRunner
from platforms.cpu.platform import CpuPlatform
from platforms.testing import write_tiny_llama

BLOCK = 16
PROMPT = [5, 77, 301, 12, 9, 400, 23]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def make_runner(tmp_path_factory):
    directory = write_tiny_llama(tmp_path_factory.mktemp("tiny"))

    def make() -> ModelRunner:
        torch.manual_seed(0)  # the same dummy weights every time
        config = EngineArgs(model=str(directory), load_format="dummy", max_model_len=256,
                            block_size=BLOCK, num_kv_blocks=8).create_config()
        platform = CpuPlatform()
        runner = ModelRunner(resolve_for_platform(config, platform), platform)
        runner.load_model()
        runner.initialize_kv_cache(8)
        return runner
    return make


def new(req_id: str, prompt: list[int], outputs: list[int] = ()) -> SchedulerOutput:
    n = len(prompt) + len(outputs)
    data = NewRequestData(req_id, list(prompt), list(outputs), GREEDY, block_ids=([1, 2],),
                          num_computed_tokens=0)
    return SchedulerOutput([data], [], {req_id: n}, n)


def cached(req_id: str, start: int, count: int, new_tokens: list[int]) -> SchedulerOutput:
    data = CachedRequestData(req_id, [], start, new_tokens)
    return SchedulerOutput([], [data], {req_id: count}, count)


def sampled(runner: ModelRunner, out: SchedulerOutput) -> int:
    result = runner.execute_model(out)
    (tokens,) = [t for t in result.sampled_token_ids if t]
    return tokens[0]


def test_a_step_result_leaves_the_runner_state_alone(make_runner):
    runner = make_runner()
    handle = runner.execute_model_async(new("a", PROMPT))
    state = runner.input_batch.requests["a"]
    before = (state.num_tokens, list(state.output_token_ids), state.num_computed_tokens)
    output = handle.result()
    assert output.sampled_token_ids == [[output.sampled_token_ids[0][0]]]
    after = (state.num_tokens, list(state.output_token_ids), state.num_computed_tokens)
    assert after == before == (len(PROMPT), [], 0)  # the sample is the scheduler's to send


def test_the_runner_computes_on_the_tokens_the_scheduler_sends(make_runner):
    runner = make_runner()
    first = sampled(runner, new("a", PROMPT))
    forced = (first + 1) % 512  # not what the runner sampled: the scheduler's word wins
    got = sampled(runner, cached("a", len(PROMPT), 1, [forced]))
    assert runner.input_batch.requests["a"].output_token_ids == [forced]
    reference = make_runner()
    assert got == sampled(reference, new("a", PROMPT + [forced]))


def test_a_step_that_starts_earlier_recomputes_from_there(make_runner):
    """Rolled-back tokens: the scheduler moves the start back (as after rejected speculative
    tokens) and the runner computes those positions again, then samples what a run that
    never went back samples."""
    def three_steps(runner: ModelRunner) -> list[int]:
        t1 = sampled(runner, new("a", PROMPT))
        t2 = sampled(runner, cached("a", len(PROMPT), 1, [t1]))
        return [t1, t2, sampled(runner, cached("a", len(PROMPT) + 1, 1, [t2]))]

    runner, straight = make_runner(), make_runner()
    t1, t2, t3 = three_steps(runner)
    assert three_steps(straight) == [t1, t2, t3]
    back = sampled(runner, cached("a", len(PROMPT), 3, [t3]))  # start 2 positions earlier
    assert runner.input_batch.requests["a"].num_computed_tokens == len(PROMPT)
    assert back == sampled(straight, cached("a", len(PROMPT) + 2, 1, [t3]))


def test_a_placeholder_takes_the_last_steps_sample_from_the_device(make_runner):
    """Async scheduling: the next step is launched before the last one's result is read;
    its input position past the sent tokens is filled from the last step's samples."""
    runner = make_runner()
    runner.execute_model_async(new("a", PROMPT))  # not waited for
    pending = runner.execute_model_async(cached("a", len(PROMPT), 1, []))
    t2 = pending.result().sampled_token_ids[0][0]
    sync = make_runner()
    t1 = sampled(sync, new("a", PROMPT))
    assert t2 == sampled(sync, cached("a", len(PROMPT), 1, [t1]))
