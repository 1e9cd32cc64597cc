"""Tensor parallelism end to end on CPU (gloo, `mp` executor): the same greedy tokens and
logprobs as one device, for a model with fewer KV heads than ranks and for SmolLM2."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import assert_same_generation, run_engine


def test_tp2_equals_tp1_when_kv_heads_fewer_than_ranks(tiny_llama_kv1):
    """num_key_value_heads=1 < TP=2: the KV head is replicated; weights load from safetensors,
    sharded while loading."""
    single = run_engine(tiny_llama_kv1, tp=1, sample=True)
    split = run_engine(tiny_llama_kv1, tp=2, sample=True)
    assert_same_generation(single, split)
    assert all(len(t) == 8 for t in single[0])
    assert single[0][3:] != single[0][:3]  # the sampled half is not greedy
    # Async scheduling (what a GPU runs by default) through the mp workers: step N+1 is sent
    # before step N's answer is collected, on placeholders; same tokens.
    overlapped = run_engine(tiny_llama_kv1, tp=2, sample=True, async_scheduling=True)
    assert_same_generation(single, overlapped)


def test_tp3_equals_tp1_on_smollm2_gguf(smollm2):
    """SmolLM2-135M has 9 query heads and 3 KV heads: it splits over 3 ranks, not 2 (TP=2
    is refused with the numbers, see test_tp_that_does_not_divide_heads_is_refused)."""
    prompts = [[1, 504, 3458, 314, 5234, 28], [1, 9519, 11, 957, 1462, 314]]
    single = run_engine(smollm2, tp=1, prompts=prompts, max_tokens=6)
    split = run_engine(smollm2, tp=3, prompts=prompts, max_tokens=6)
    assert_same_generation(single, split, atol=2e-3)


def test_tp_that_does_not_divide_heads_is_refused(smollm2):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=r"num_attention_heads \(9\).*--tensor-parallel-size"):
        EngineArgs(model=smollm2, tensor_parallel_size=2).create_config()


def test_unavailable_parallel_modes_are_refused_with_the_flag(tiny_llama_kv1):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match="--pipeline-parallel-size"):  # 2 layers, 3 stages
        EngineArgs(model=tiny_llama_kv1, pipeline_parallel_size=3).create_config()
    config = EngineArgs(model=tiny_llama_kv1, tensor_parallel_size=2).create_config()
    assert config.parallel.distributed_executor_backend == "mp"
    assert EngineArgs(model=tiny_llama_kv1).create_config().parallel.distributed_executor_backend \
        == "uniproc"


def test_parallel_flags_reach_engine_args():
    import argparse

    from engine.entrypoints.args import add_engine_args, engine_args_from_namespace

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["-tp", "2", "--distributed-executor-backend", "mp"])
    args = engine_args_from_namespace(ns, model="m")
    assert (args.tensor_parallel_size, args.distributed_executor_backend) == (2, "mp")
    with pytest.raises(SystemExit):  # not a known backend
        parser.parse_args(["--distributed-executor-backend", "threads"])
