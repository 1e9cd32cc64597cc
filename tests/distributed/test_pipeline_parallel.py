"""Pipeline parallelism end to end on CPU (gloo, `mp` executor): the same greedy tokens and
logprobs as one device, micro-batches really in flight together, a killed stage failing
the engine, and the flags and split checks."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.sampling_params import SamplingParams
from tests.distributed.conftest import PROMPTS, assert_same_generation, run_engine

# Enough distinct prompts that the pipeline can hold two micro-batches of requests.
MANY = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], list(range(500, 530)),
                  [42] * 12, [11, 22, 33]]


def test_pp2_equals_pp1(tiny_llama_kv1):
    """Layers 0 and 1 on two stages (embedding on the first, norm and head on the last);
    greedy tokens, logprobs and unseeded sampling as with one device."""
    single = run_engine(tiny_llama_kv1, tp=1, prompts=MANY, sample=True)
    split = run_engine(tiny_llama_kv1, tp=1, prompts=MANY, sample=True,
                       pipeline_parallel_size=2)
    assert_same_generation(single, split)
    assert all(len(t) == 8 for t in single[0])


def test_micro_batches_are_in_flight_together(tiny_llama_kv1):
    """With more requests than one micro-batch takes, the core dispatches a second batch
    before the first has come back, every step that has work, and each batch holds about
    half the requests."""
    from engine.entrypoints.llm import LLM

    llm = LLM(tiny_llama_kv1, pipeline_parallel_size=2, num_kv_blocks=64, max_model_len=256,
              max_num_seqs=8)
    try:
        assert llm.core.executor.max_concurrent_batches == 2
        queue = llm.core.batch_queue
        sizes: list[int] = []
        schedule = llm.core.scheduler.schedule

        def recording_schedule():
            out = schedule()
            if not out.is_empty:
                sizes.append(len(out.num_scheduled_tokens))
            return out

        llm.core.scheduler.schedule = recording_schedule
        outs = llm.generate([{"prompt_token_ids": p} for p in MANY],
                            SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
        timelines = llm.core.executor._call("stage_timeline")
    finally:
        llm.core.shutdown()
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert queue.max_in_flight == 2
    # 8 requests, 6 tokens each, 4 per batch: about 12 batches, all but the first overlap.
    assert queue.num_overlapped >= len(sizes) - 2 >= 8
    assert max(sizes) == 4
    # The stages themselves overlap: stage 0 starts batch k+1 before stage 1 has finished
    # batch k. A one-batch-at-a-time pipeline never does (k+1 is not sent before k's result
    # is back): 0 then, about half the steps here when idle (a tiny model's stage takes about
    # as long as the core's turn-around, so the count varies with load: one full run of the
    # suite saw 1 of 12; one is already impossible without overlap).
    first, last = timelines
    assert len(first) == len(last) >= len(sizes)
    overlapping = sum(first[k + 1][0] < last[k][1] for k in range(len(first) - 1))
    assert overlapping >= 1, (overlapping, len(sizes))


def test_tp2_pp2_equals_tp1(tiny_llama_kv1):
    """Four processes: two stages of two tensor-parallel ranks each (the KV head replicated
    on both ranks of a stage)."""
    single = run_engine(tiny_llama_kv1, tp=1)
    split = run_engine(tiny_llama_kv1, tp=2, pipeline_parallel_size=2)
    assert_same_generation(single, split)


def test_killed_stage_fails_the_engine_in_seconds(tiny_llama_kv1):
    from engine.entrypoints.llm import LLM
    from engine.executor.abstract import WorkerDiedError

    llm = LLM(tiny_llama_kv1, pipeline_parallel_size=2, num_kv_blocks=64, max_model_len=256)
    try:
        victim = llm.core.executor.procs[1]  # the last stage, the one that samples
        os.kill(victim.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 .*killed by signal 9"):
            llm.generate([{"prompt_token_ids": p} for p in MANY],
                         SamplingParams(temperature=0.0, max_tokens=50), use_tqdm=False)
        assert time.monotonic() - start < 45  # generous for a loaded machine
    finally:
        llm.core.shutdown()
    assert all(p.poll() is not None for p in llm.core.executor.procs)


def test_first_stage_killed_mid_generation_fails_the_engine_in_seconds(tiny_llama_kv1):
    """Killed while batches are in flight (at the engine's 5th step): the last stage is left
    waiting for activations that never come, and the executor's watch reports the dead rank
    instead of hanging."""
    from engine.entrypoints.llm import LLM
    from engine.executor.abstract import WorkerDiedError

    llm = LLM(tiny_llama_kv1, pipeline_parallel_size=2, num_kv_blocks=64, max_model_len=256,
              max_num_seqs=8)
    try:
        victim = llm.core.executor.procs[0]
        step, calls, killed_at = llm.core.step, [], []

        def step_then_kill():
            calls.append(1)
            if len(calls) == 5:
                assert len(llm.core.batch_queue) > 0  # a batch is in the pipeline
                os.kill(victim.pid, signal.SIGKILL)
                killed_at.append(time.monotonic())
            return step()

        llm.core.step = step_then_kill
        with pytest.raises(WorkerDiedError, match=r"rank 0 .*killed by signal 9"):
            llm.generate([{"prompt_token_ids": p} for p in MANY],
                         SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True),
                         use_tqdm=False)
        assert time.monotonic() - killed_at[0] < 45  # generous for a loaded machine
    finally:
        llm.core.shutdown()
    assert all(p.poll() is not None for p in llm.core.executor.procs)


def test_more_stages_than_layers_is_refused(tiny_llama_kv1):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=r"num_hidden_layers \(2\).*--pipeline-parallel-size "
                                         r"\(3\)"):
        EngineArgs(model=tiny_llama_kv1, pipeline_parallel_size=3).create_config()
    with pytest.raises(ValueError, match="one process per stage"):
        EngineArgs(model=tiny_llama_kv1, pipeline_parallel_size=2,
                   distributed_executor_backend="uniproc").create_config()
    config = EngineArgs(model=tiny_llama_kv1, pipeline_parallel_size=2).create_config()
    assert config.parallel.distributed_executor_backend == "mp"


def test_pp_flag_reaches_engine_args():
    import argparse

    from engine.entrypoints.args import add_engine_args, engine_args_from_namespace

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = engine_args_from_namespace(parser.parse_args(["-pp", "2"]), model="m")
    assert args.pipeline_parallel_size == 2
    args = engine_args_from_namespace(parser.parse_args(["--pipeline-parallel-size", "3"]),
                                      model="m")
    assert args.pipeline_parallel_size == 3


def test_pp2_equals_pp1_on_smollm2_gguf(smollm2):
    """SmolLM2-135M: 30 layers over two stages and a head tied to the embedding (the last
    stage keeps its own copy of the table for the head)."""
    prompts = [[1, 504, 3458, 314, 5234, 28], [1, 9519, 11, 957, 1462, 314]]
    single = run_engine(smollm2, tp=1, prompts=prompts, max_tokens=6)
    split = run_engine(smollm2, tp=1, prompts=prompts, max_tokens=6, pipeline_parallel_size=2)
    assert_same_generation(single, split, atol=2e-3)


def test_dummy_weights_are_the_same_model_on_every_stage_layout(tiny_llama_kv1):
    """Random weights are seeded by parameter name, so a stage's layers get the values the
    whole model would give them (seeding by position would shift them per stage)."""
    single = run_engine(tiny_llama_kv1, tp=1, load_format="dummy")
    split = run_engine(tiny_llama_kv1, tp=1, load_format="dummy", pipeline_parallel_size=2)
    assert_same_generation(single, split)
    saved = run_engine(tiny_llama_kv1, tp=1)
    assert single[0] != saved[0]  # really the random weights, not the saved ones


def test_cli_generate_with_pp2(tiny_llama_kv1):
    """`engine generate -pp 2` runs the same greedy completion as without it."""
    import subprocess
    import sys

    def generate(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "engine.entrypoints.cli", "generate", tiny_llama_kv1,
             "--prompt", "The capital of France is", "--max-tokens", "6",
             "--num-kv-blocks", "32", "--max-model-len", "128", *extra],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    single, split = generate(), generate("-pp", "2")
    assert "'The capital of France is' ->" in split
    assert split == single


def test_kv_cache_is_sized_for_the_stage_layers(tiny_llama_kv1):
    """A stage holds half the layers, so the same KV memory holds twice the blocks."""
    from engine.entrypoints.llm import LLM

    blocks = []
    for pp in (1, 2):
        llm = LLM(tiny_llama_kv1, pipeline_parallel_size=pp, kv_cache_memory=2**20,
                  max_model_len=256)
        blocks.append(llm.core.num_blocks)
        llm.core.shutdown()
    assert blocks[1] == 2 * blocks[0]


def test_served_pp2_runs_and_a_killed_stage_kills_the_engine_loudly(tiny_llama_kv1):
    """`engine serve -pp 2`'s path: the core in its own process with two stage workers as
    its children; requests finish, a killed stage reaches the client as EngineDeadError."""
    from engine.engine_args import EngineArgs
    from engine.engine_core.mp_client import SyncMPClient
    from tests.distributed.test_mp_served import (
        _children,
        _request,
        assert_all_exit,
        assert_killed_worker_fails_fast,
    )

    args = EngineArgs(model=tiny_llama_kv1, pipeline_parallel_size=2, num_kv_blocks=16)
    client = SyncMPClient(args, log_level="warning")
    core_pid = client.pid
    try:
        client.wait_until_ready(timeout_s=300)
        workers = _children(core_pid)
        assert len(workers) == 2, workers
        for rid in ("a", "b", "c"):
            client.add_request(_request(rid))
        tokens: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        finished: set[str] = set()
        give_up = time.monotonic() + 60
        while finished != set(tokens) and time.monotonic() < give_up:
            for out in client.get_output().outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    finished.add(out.request_id)
        assert [len(t) for t in tokens.values()] == [4, 4, 4]
        assert_killed_worker_fails_fast(client, workers[0], "d", match="worker rank 0")
    finally:
        client.shutdown()
    assert_all_exit([core_pid, *workers])
