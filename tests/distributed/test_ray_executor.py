"""The Ray executor on a local Ray cluster started here (CPU bundles, gloo): TP=2 on Ray
equals TP=1; a killed actor fails the engine in seconds with its rank; shutdown kills the
actors and removes the placement group; a cluster too small fails with what it lacked."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.executor.ray import _rank_order
from tests.distributed.conftest import assert_same_generation, run_engine

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'engine[ray]' (scripts/setup.sh does)"
)

# Logical CPUs of the test cluster: a TP=2 engine fits (one CPU bundle per rank), a TP=4
# engine does not.
_CLUSTER_CPUS = 3


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    # As the engine does when it starts Ray itself: workers at normal priority (Ray's
    # default nice 15 starves them beside other work on a busy CI machine).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=_CLUSTER_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_tp2_on_ray_equals_tp1(ray_cluster, tiny_llama_kv1):
    single = run_engine(tiny_llama_kv1, tp=1)
    on_ray = run_engine(tiny_llama_kv1, tp=2, distributed_executor_backend="ray")
    assert_same_generation(single, on_ray)
    assert all(len(t) == 8 for t in single[0])


def test_killed_actor_fails_the_engine_in_seconds_and_shutdown_cleans_up(ray_cluster,
                                                                        tiny_llama_kv1):
    from engine.entrypoints.llm import LLM
    from engine.executor.abstract import WorkerDiedError
    from engine.sampling_params import SamplingParams

    llm = LLM(tiny_llama_kv1, tensor_parallel_size=2, distributed_executor_backend="ray",
              num_kv_blocks=32, max_model_len=128, load_format="dummy")
    executor = llm.core.executor
    pids = [pid for _, pid in executor.placement]
    pg_id = executor._pg.id.hex()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    try:
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=f"worker rank 1 .*pid {pids[1]}.* died"):
            llm.generate([[4, 5, 6]], params, use_tqdm=False)
        assert time.monotonic() - start < 45  # generous for a loaded machine
        with pytest.raises(WorkerDiedError, match="failed earlier"):  # stays failed
            llm.core.executor.execute_model(None)
    finally:
        llm.core.shutdown()
    deadline = time.monotonic() + 45
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_pid_alive(p) for p in pids)
    state = ray.util.placement_group_table()[pg_id]["state"]
    assert state == "REMOVED"
    # Every CPU is free again for the next engine.
    deadline = time.monotonic() + 45
    while ray.available_resources().get("CPU", 0) < _CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == _CLUSTER_CPUS


def test_cluster_too_small_fails_with_what_it_lacked(ray_cluster, tiny_llama_kv1, monkeypatch):
    from engine.entrypoints.llm import LLM

    monkeypatch.setenv("ENGINE_RAY_PLACEMENT_TIMEOUT_S", "2")
    with pytest.raises(RuntimeError, match=r"did not grant 4 bundles of \{'CPU': 1.0\}"):
        LLM(tiny_llama_kv1, tensor_parallel_size=4, distributed_executor_backend="ray",
            num_kv_blocks=32, max_model_len=128, load_format="dummy")
    deadline = time.monotonic() + 45
    while ray.available_resources().get("CPU", 0) < _CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == _CLUSTER_CPUS  # nothing left reserved


def test_ranks_are_grouped_by_node_first_bundle_first():
    assert _rank_order(["a", "a"]) == [0, 1]
    assert _rank_order(["b", "a", "b", "a"]) == [0, 2, 1, 3]
    assert _rank_order(["a", "b", "c", "b"]) == [0, 1, 3, 2]


def test_served_core_process_joins_the_cluster_at_ray_address(ray_cluster, tiny_llama_kv1,
                                                              monkeypatch):
    """`engine serve`'s path: the core runs in its own (daemonic) process, connects to the
    cluster RAY_ADDRESS names (here the one this process started), and its actors run a
    request there."""
    from engine.engine_args import EngineArgs
    from engine.engine_core.mp_client import SyncMPClient
    from engine.messages.core import EngineCoreRequest
    from engine.sampling_params import SamplingParams

    args = EngineArgs(model=tiny_llama_kv1, tensor_parallel_size=2, num_kv_blocks=16,
                      max_model_len=128, load_format="dummy", distributed_executor_backend="ray")
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    client = SyncMPClient(args, log_level="warning")
    try:
        client.wait_until_ready(timeout_s=300)
        client.add_request(EngineCoreRequest(
            "a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
            None, time.time()))
        tokens: list[int] = []
        while True:
            outs = [o for o in client.get_output().outputs if o.request_id == "a"]
            tokens += [t for o in outs for t in o.new_token_ids]
            if any(o.finished for o in outs):
                break
        assert len(tokens) == 4
        # The actors live in this process's cluster: two CPUs taken while it runs.
        assert ray.available_resources().get("CPU", 0) == _CLUSTER_CPUS - 2
    finally:
        client.shutdown()
    deadline = time.monotonic() + 45  # the core's shutdown gave its bundles back
    while ray.available_resources().get("CPU", 0) < _CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == _CLUSTER_CPUS


def test_pp2_on_ray_equals_pp1_with_batches_in_flight(ray_cluster, tiny_llama_kv1):
    """Two pipeline stages as two actors: each actor runs its calls in order, so the core
    keeps two batches in flight (stage 0 on batch k+1 while stage 1 finishes batch k)."""
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    single = run_engine(tiny_llama_kv1, tp=1)
    on_ray = run_engine(tiny_llama_kv1, tp=1, pipeline_parallel_size=2,
                        distributed_executor_backend="ray")
    assert_same_generation(single, on_ray)

    llm = LLM(tiny_llama_kv1, pipeline_parallel_size=2, distributed_executor_backend="ray",
              num_kv_blocks=64, max_model_len=256, max_num_seqs=8)
    try:
        queue = llm.core.batch_queue
        assert queue is not None and queue.depth == 2
        prompts = [{"prompt_token_ids": [3 + i, 5, 7 + i, 11]} for i in range(8)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6),
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        assert queue.max_in_flight == 2 and queue.num_overlapped >= 4
    finally:
        llm.core.shutdown()
