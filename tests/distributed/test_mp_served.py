"""TP=2 behind the served engine-core process (`engine serve`'s path): the core runs in a
daemonic process, its workers are its children; a killed worker reaches the client as
EngineDeadError within seconds, and every process is gone afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.engine_args import EngineArgs
from engine.engine_core.mp_client import EngineDeadError, SyncMPClient
from engine.messages.core import EngineCoreRequest
from engine.sampling_params import SamplingParams


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def assert_all_exit(pids: list[int], within_s: float = 45.0) -> None:
    """Every process in `pids` is gone within `within_s` (none left behind a dead engine)."""
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]


def assert_killed_worker_fails_fast(client: SyncMPClient, pid: int, request_id: str,
                                    match: str) -> None:
    """Kill worker `pid`; the next request fails with EngineDeadError (matching `match`)
    within 45 s (seconds when idle; generous for a loaded machine) instead of hanging."""
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    client.add_request(_request(request_id))
    with pytest.raises(EngineDeadError, match=match):
        _finish(client, request_id)
    assert time.monotonic() - start < 45


def _request(request_id: str) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, [1, 2, 3, 4],
                             SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                             eos_token_id=2, arrival_time=time.time())


def _finish(client: SyncMPClient, request_id: str) -> list[int]:
    tokens: list[int] = []
    while True:
        for out in client.get_output().outputs:
            if out.request_id == request_id:
                tokens += out.new_token_ids
                if out.finished:
                    return tokens


def test_served_tp2_runs_and_a_killed_worker_kills_the_engine_loudly(tiny_llama_kv1):
    args = EngineArgs(model=tiny_llama_kv1, tensor_parallel_size=2, num_kv_blocks=16,
                      load_format="dummy")
    client = SyncMPClient(args, log_level="warning")
    core_pid = client.pid
    try:
        client.wait_until_ready(timeout_s=300)
        workers = _children(core_pid)
        assert len(workers) == 2, workers
        client.add_request(_request("a"))
        assert len(_finish(client, "a")) == 4
        assert_killed_worker_fails_fast(client, workers[1], "b", match="worker rank")
    finally:
        client.shutdown()
    assert_all_exit([core_pid, *workers])
