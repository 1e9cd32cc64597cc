"""`engine serve` with --api-key, then the engine core killed: 401s, then 503 and exit != 0."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from serve_fixtures import pid_alive, start_server

KEY = "s3cret"


@pytest.fixture(scope="module")
def server():
    srv = start_server("--api-key", KEY, "--max-model-len", "512", "--log-level", "warning",
                       "--kv-cache-memory", "256m")
    yield srv
    srv.stop()


def _client(server, key):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def test_api_key_is_required_on_v1_only(server):
    with pytest.raises(openai.AuthenticationError) as err:
        _client(server, "wrong").models.list()
    assert err.value.status_code == 401 and "--api-key" in err.value.body["message"]
    assert httpx.post(server.base_url + "/v1/completions", json={}).status_code == 401
    assert [m.id for m in _client(server, KEY).models.list().data]
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_killed_engine_core_gives_503_then_nonzero_exit(server):
    client = _client(server, KEY)
    core_pid = httpx.get(server.base_url + "/ready").json()["engine_core_pid"]
    assert client.completions.create(model=client.models.list().data[0].id, prompt="Hi",
                                     max_tokens=2).choices
    killed_at = time.monotonic()
    os.kill(core_pid, signal.SIGKILL)
    while httpx.get(server.base_url + "/health").status_code != 503:
        # Noticed in well under a second when idle; generous for a loaded CI machine.
        assert time.monotonic() - killed_at < 15.0, "core death not noticed"
        time.sleep(0.02)
    print(f"core death noticed after {time.monotonic() - killed_at:.2f} s")
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="any", prompt="Hi", max_tokens=2)
    assert err.value.status_code == 503
    message = err.value.body["message"]
    assert "Traceback" not in message and ".py" not in message and "not running" in message
    assert server.process.wait(timeout=60) != 0
    assert not pid_alive(core_pid)
