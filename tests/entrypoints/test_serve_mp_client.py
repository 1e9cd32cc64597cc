"""The blocking multiprocess client (EngineCoreClient) against a real engine-core process."""

from __future__ import annotations

import time

import pytest
from serve_fixtures import pid_alive, smollm2_path

from engine.engine_args import EngineArgs
from engine.engine_core.mp_client import EngineDeadError, SyncMPClient
from engine.messages.core import EngineCoreRequest
from engine.sampling_params import SamplingParams


def _request(request_id: str, max_tokens: int) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, [1, 504, 3458, 282, 4649, 314],
                             SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                            ignore_eos=True),
                             eos_token_id=2, arrival_time=time.time())


def test_sync_client_runs_requests_aborts_and_shuts_down():
    args = EngineArgs(model=smollm2_path(), max_model_len=256, kv_cache_memory="64m")
    client = SyncMPClient(args, log_level="warning")
    try:
        assert "load" in client.wait_until_ready(timeout_s=300)
        assert client.call_utility("ping") == "pong"
        with pytest.raises(RuntimeError, match="Unknown utility"):
            client.call_utility("shutdown")  # not on the allow-list
        client.add_request(_request("a", 5))
        client.add_request(_request("b", 200))
        tokens: dict[str, list[int]] = {"a": [], "b": []}
        finished = set()
        while "a" not in finished:
            for out in client.get_output().outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    finished.add(out.request_id)
        assert len(tokens["a"]) == 5 and "b" not in finished
        client.abort_requests(["b"])
        stats = None
        while stats is None or stats.num_running_reqs or stats.kv_cache_usage:
            stats = client.get_output().scheduler_stats
        assert stats.kv_cache_usage == 0.0
        assert client.call_utility("reset_prefix_cache") in (True, None)
    finally:
        pid = client.pid
        client.shutdown()
    assert not pid_alive(pid)
    with pytest.raises(EngineDeadError):
        client.get_output()
