"""The `mp` executor's life: engines created and destroyed one after another in one process
(with dummy weights, which are the same model at every TP size), and a killed worker that
fails the engine quickly with a clear error instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.engine_args import EngineArgs
from engine.engine_core.core import EngineCore
from engine.entrypoints.llm import LLM
from engine.executor.abstract import WorkerDiedError
from engine.executor.mp import MultiprocExecutor
from engine.sampling_params import SamplingParams
from tests.distributed.conftest import assert_same_generation, run_engine


def test_dummy_weights_tp2_twice_in_one_process_equal_tp1(tiny_llama_kv1):
    """Dummy weights draw each full tensor then keep the rank's slice: TP=1 and TP=2 are one
    model. Two TP=2 engines in a row: the first leaves no process or group behind."""
    single = run_engine(tiny_llama_kv1, tp=1, load_format="dummy")
    first = run_engine(tiny_llama_kv1, tp=2, load_format="dummy")
    second = run_engine(tiny_llama_kv1, tp=2, load_format="dummy")
    assert_same_generation(single, first)
    assert_same_generation(first, second, atol=0.0)
    real = run_engine(tiny_llama_kv1, tp=1)
    assert real[0] != single[0]  # the dummy model really is another model


def test_shutdown_stops_every_worker(tiny_llama_kv1):
    config = EngineArgs(model=tiny_llama_kv1, tensor_parallel_size=2, num_kv_blocks=16,
                        load_format="dummy").create_config()
    core = EngineCore(config)
    executor = core.executor
    assert isinstance(executor, MultiprocExecutor)
    pids = [p.pid for p in executor.procs]
    core.shutdown()
    assert [p.poll() for p in executor.procs] == [0, 0]  # exited on request, not killed
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killed_worker_fails_the_engine_within_seconds(tiny_llama_kv1):
    llm = LLM(tiny_llama_kv1, tensor_parallel_size=2, num_kv_blocks=16, load_format="dummy")
    executor = llm.core.executor
    params = SamplingParams(temperature=0.0, max_tokens=4)
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)  # healthy
        victim = executor.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) died \(killed by "
                                                  r"signal 9\)"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
        assert time.monotonic() - start < 45  # seconds when idle; generous when loaded
        with pytest.raises(WorkerDiedError, match="failed earlier"):  # stays failed
            llm.core.executor.execute_model(None)  # type: ignore[arg-type]
    finally:
        llm.core.shutdown()
    assert all(p.poll() is not None for p in executor.procs)
