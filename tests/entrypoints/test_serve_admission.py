"""Bad requests to a live server: each is refused with a 400 in the OpenAI shape, naming the
field, and the server (same engine-core pid) keeps serving."""

from __future__ import annotations

import httpx
import pytest
from serve_fixtures import pid_alive, start_server

from engine.entrypoints.openai.unsupported import UNSUPPORTED_FIELDS

OOV = 10_000_000
CMPL = {"prompt": "Hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

BAD = [  # (route, body, param)
    ("completions", {"prompt": [1, 2, OOV], "max_tokens": 2}, "prompt"),
    ("completions", {**CMPL, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {**CMPL, "stop_token_ids": [OOV]}, "stop_token_ids"),
    ("completions", {**CMPL, "logit_bias": {str(OOV): 5}}, "logit_bias"),
    ("chat/completions", {**CHAT, "logit_bias": {"-3": 1}}, "logit_bias"),
    ("completions", {**CMPL, "logit_bias": {"1": 1e308}}, "logit_bias"),
    ("completions", {**CMPL, "temperature": 1e308}, "temperature"),
    ("completions", {**CMPL, "top_p": -0.5}, "top_p"),
    ("completions", {**CMPL, "presence_penalty": 9.0}, "presence_penalty"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    ("completions", {**CMPL, "n": 1000}, "n"),
    ("completions", {**CMPL, "logprobs": 10_000}, "logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10_000}, "logprobs"),
    ("completions", {**CMPL, "priority": 2**70}, "priority"),  # past the wire's 64 bits
    ("completions", {**CMPL, "max_tokens": True}, "max_tokens"),  # strict JSON types
    ("completions", {**CMPL, "seed": "5"}, "seed"),
] + [
    ("chat/completions", {**CHAT, name: value}, name) for name, value in [
        ("reasoning_effort", "low"), ("functions", [{"name": "f"}]), ("function_call", "auto")]
] + [("completions", {**CMPL, "suffix": "end"}, "suffix")] + [
    # tools with tool_choice="auto" (the default) on a server without --tool-call-parser,
    # and a choice that needs tools without any
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice"),
    ("chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
]


@pytest.fixture(scope="module")
def server():
    srv = start_server("--max-model-len", "256", "--kv-cache-memory", "256m")
    yield srv
    srv.stop()


def test_every_unsupported_field_is_covered():
    assert {body_param for _, _, body_param in BAD} >= set(UNSUPPORTED_FIELDS)


def test_bad_requests_get_400_naming_the_field_and_the_server_stays_up(server):
    core_pid = httpx.get(server.base_url + "/ready").json()["engine_core_pid"]
    with httpx.Client(base_url=server.base_url + "/v1", timeout=120) as http:
        for route, body, param in BAD:
            r = http.post("/" + route, content=httpx.Request(
                "POST", "/", json=body).content.replace(b"1e+308", b"1e308"),
                headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, r.text
            assert error["param"] == param, (body, error)
            assert error["type"] == "BadRequestError"
        for value in (b"NaN", b"Infinity", b"-Infinity"):
            r = http.post("/completions", headers={"content-type": "application/json"},
                          content=b'{"prompt": "Hi", "max_tokens": 2, "temperature": ' + value
                          + b"}")
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "temperature"
        parts = http.post("/chat/completions", json={"max_tokens": 3, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                         {"type": "text", "text": "there"}]}]})
        assert parts.status_code == 200, parts.text
        assert parts.json()["usage"]["completion_tokens"] >= 1
        ok = http.post("/completions", json={**CMPL, "temperature": 0.0,
                                             "response_format": {"type": "text"},
                                             "tool_choice": "none", "some_unknown": 1})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.base_url + "/ready").json()["engine_core_pid"] == core_pid
    assert pid_alive(core_pid)
