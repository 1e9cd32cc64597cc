"""`engine serve` refuses bad input in the OpenAI shape, guards every working route with
--api-key, and drains on SIGTERM: a real server subprocess with SmolLM2."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from serve_fixtures import pid_alive, start_server

KEY = "s3cret"
AUTH = {"Authorization": f"bEaReR {KEY}"}  # RFC 7235: the scheme is case-insensitive
JSON = {**AUTH, "content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmpdir = str(tmp_path_factory.mktemp("server-tmp"))
    srv = start_server("--api-key", KEY, "--max-model-len", "512", "--log-level", "warning",
                       "--kv-cache-memory", "256m", "--shutdown-timeout", "2", tmpdir=tmpdir)
    srv.tmpdir = tmpdir
    yield srv
    srv.stop()


def _assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and ".py" not in error["message"]
    return error


def test_bad_inputs_get_openai_shaped_errors_and_the_server_stays_up(server):
    b = server.base_url
    _assert_openai_error(httpx.get(b + "/no/such/route", headers=AUTH), 404)
    _assert_openai_error(httpx.get(b + "/v1/completions", headers=AUTH), 405)
    err = _assert_openai_error(httpx.post(b + "/v1/completions", content=b'{"prompt": ',
                                          headers=JSON), 400)
    assert err["param"] is None  # never a byte offset
    _assert_openai_error(httpx.post(b + "/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                                    headers=JSON), 400)
    err = _assert_openai_error(httpx.post(b + "/v1/completions", headers=AUTH, timeout=60,
                                          json={"prompt": "a" * 10_000_000}), 413)
    assert "--max-request-body-bytes" in err["message"]
    err = _assert_openai_error(httpx.post(b + "/v1/completions", headers=AUTH, timeout=60,
                                          json={"prompt": "a " * 1_000_000}), 400)
    assert "max_model_len=512" in err["message"] and err["param"] == "prompt"
    ok = httpx.post(b + "/v1/completions", headers=AUTH, timeout=60,
                    json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"]


def test_health_answers_fast_while_a_huge_prompt_is_refused(server):
    b = server.base_url
    done = threading.Event()

    def refuse() -> None:
        httpx.post(b + "/v1/completions", headers=AUTH, timeout=120,
                   json={"prompt": "word " * 700_000, "max_tokens": 2})
        done.set()

    thread = threading.Thread(target=refuse)
    thread.start()
    latencies = []
    while not done.is_set() or len(latencies) < 5:
        t0 = time.perf_counter()
        assert httpx.get(b + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
    thread.join()
    print(f"/health latency during refusal: max {max(latencies, default=0) * 1e3:.1f} ms")
    assert latencies and sorted(latencies)[len(latencies) // 2] < 0.1


def test_api_key_guards_working_routes_only(server):
    b = server.base_url
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("POST", "/reset_prefix_cache"), ("GET", "/v1/models")]:
        resp = httpx.request(method, b + path, json={})
        _assert_openai_error(resp, 401)
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    for path in ["/health", "/ready", "/version", "/metrics"]:
        assert httpx.get(b + path).status_code == 200, path
    assert httpx.post(b + "/tokenize", json={"prompt": "hi"}, headers=AUTH).json()["count"]


def _gauge(text: str, name: str) -> float:
    line = next(li for li in text.splitlines() if li.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_disconnected_non_streaming_clients_abort_their_requests(server):
    import asyncio

    async def one(client: httpx.AsyncClient, i: int) -> None:
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/completions", timeout=httpx.Timeout(60, read=1.0),
                              json={"prompt": f"n{i}", "max_tokens": 400, "ignore_eos": True})

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH,
                                     limits=httpx.Limits(max_connections=200)) as client:
            await asyncio.gather(*(one(client, i) for i in range(100)))

    asyncio.run(main())
    left = time.monotonic()
    deadline = left + 60  # generous on a loaded machine; the measured time is printed
    while True:
        text = httpx.get(server.base_url + "/metrics").text
        gauges = (_gauge(text, "engine:num_requests_running"),
                  _gauge(text, "engine:kv_cache_usage_perc"))
        if gauges == (0.0, 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"disconnect: running and KV usage at 0 after {time.monotonic() - left:.2f} s")
    assert gauges == (0.0, 0.0)


def test_the_openapi_document_describes_what_the_server_answers(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            ok = responses["200"]["content"]
            assert ok and all(c.get("schema") for c in ok.values()), (method, path)
            for status, response in responses.items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == error_ref
            guarded = path not in ("/health", "/ready", "/version", "/metrics")
            assert ("401" in responses) == guarded == ("security" in op), (method, path)
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "404", "413", "500", "503"} <= set(completions)
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    health = httpx.get(server.base_url + "/health")
    assert health.json() == {"status": "ok"}
    assert httpx.get(server.base_url + "/metrics").headers["content-type"].startswith(
        "text/plain")


def test_sigterm_drains_streams_with_an_error_event_and_done(server):
    b = server.base_url
    core_pid = httpx.get(b + "/ready").json()["engine_core_pid"]
    tails: list[list[str]] = []
    started = threading.Barrier(9, timeout=120)

    def stream(i: int) -> None:
        with httpx.stream("POST", b + "/v1/completions", headers=AUTH, timeout=120,
                          json={"prompt": f"s{i}", "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line)
            started.wait()
            tails.append(([first] + [line for line in lines if line])[-2:])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    t0 = time.monotonic()
    assert server.stop(timeout_s=60) == 0, server.log()
    print(f"drain: exit after {time.monotonic() - t0:.2f} s")
    for t in threads:
        t.join(60)
    assert len(tails) == 8
    for last_two in tails:
        assert last_two[-1] == "data: [DONE]"
        assert '"code":503' in last_two[0] and "shutting down" in last_two[0]
    assert not pid_alive(core_pid)
    # Its IPC sockets lived in the server's TMPDIR; nothing is left behind.
    assert not [n for n in os.listdir(server.tmpdir) if n.startswith("engine-ipc-")]

