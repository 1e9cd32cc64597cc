"""`engine serve` with LoRA adapters: a real server over a tiny random Llama and random peft
adapters (ranks 4 and 8, one of 16 for the refusal). /v1/models lists the adapters with their
parent, model=NAME runs that adapter, an unknown name is a 404 naming what is served, and the
runtime load/unload routes exist only with --allow-runtime-lora-updating, behind the key."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.entrypoints.serve_fixtures import start_server
from tests.lora.tiny_model import make_adapters, make_tiny_llama

KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lora")
    base = make_tiny_llama(root / "base")
    adapters = [path for path, _ in make_adapters(base, root, [4, 8, 16])]
    return base, adapters


@pytest.fixture(scope="module")
def server(models):
    base, (r4, r8, _) = models
    srv = start_server(
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"a4={r4}", json.dumps({"name": "a8", "path": str(r8)}),
        "--allow-runtime-lora-updating", "--api-key", KEY, "--max-model-len", "256",
        "--num-kv-blocks", "64", "--served-model-name", "base",
        model=str(base), env_extra={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": ""})
    yield srv
    srv.stop()


def post(server, path: str, body: dict, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def complete(server, model: str) -> httpx.Response:
    return post(server, "/v1/completions", {**GREEDY, "model": model})


def test_models_lists_the_adapters_with_their_parent(server, models):
    _, (r4, r8, _) = models
    data = httpx.get(server.base_url + "/v1/models", headers=AUTH).json()["data"]
    by_id = {card["id"]: card for card in data}
    assert list(by_id) == ["base", "a4", "a8"]
    assert by_id["base"]["parent"] is None
    assert (by_id["a4"]["parent"], by_id["a4"]["root"]) == ("base", str(r4))
    assert (by_id["a8"]["parent"], by_id["a8"]["root"]) == ("base", str(r8))


def test_model_name_selects_the_adapter(server):
    base = complete(server, "base")
    a4, a8 = complete(server, "a4"), complete(server, "a8")
    assert base.status_code == a4.status_code == a8.status_code == 200, a4.text
    texts = [r.json()["choices"][0]["text"] for r in (base, a4, a8)]
    assert texts[1] != texts[0] and texts[2] != texts[0] and texts[1] != texts[2]
    assert a4.json()["model"] == "a4"
    # The same adapter again: the same greedy answer (prefix-cache hit within it).
    assert complete(server, "a4").json()["choices"][0]["text"] == texts[1]
    chat = post(server, "/v1/chat/completions", {
        "model": "a8", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "temperature": 0.0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "a8"


def test_unknown_model_is_a_404_naming_what_is_served(server):
    response = complete(server, "nope")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "nope" in message and "a4" in message and "base" in message


def test_runtime_load_use_unload(server, models):
    _, (r4, _, r16) = models
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(r4)},
                headers={}).status_code == 401  # behind the API key
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(r4)})
    assert loaded.status_code == 200, loaded.text
    ids = [c["id"] for c in httpx.get(server.base_url + "/v1/models", headers=AUTH).json()["data"]]
    assert "rt" in ids
    used = complete(server, "rt")
    assert used.status_code == 200
    # Same directory as a4, another id: the same weights, so the same answer.
    assert used.json()["choices"][0]["text"] == complete(server, "a4").json()["choices"][0]["text"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"}).status_code == 200
    assert complete(server, "rt").status_code == 404
    again = post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert again.status_code == 404 and "rt" in again.json()["error"]["message"]


def test_runtime_load_refusals_are_400s_with_the_reason(server, models, tmp_path):
    _, (r4, _, r16) = models
    too_big = post(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(r16)})
    assert too_big.status_code == 400
    message = too_big.json()["error"]["message"]
    assert "rank 16" in message and "--max-lora-rank 8" in message
    for body in ({"lora_name": "x", "lora_path": str(tmp_path)},  # no adapter_config.json
                 {"lora_name": "x", "lora_path": str(tmp_path / "absent")},
                 {"lora_name": "base", "lora_path": str(r4)},  # the base model's name
                 {"lora_name": "a4", "lora_path": str(r4)}):  # already served
        response = post(server, "/v1/load_lora_adapter", body)
        assert response.status_code == 400, (body, response.text)
    ids = [c["id"] for c in httpx.get(server.base_url + "/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["base", "a4", "a8"]


def test_runtime_routes_are_absent_without_the_flag(models):
    base, (r4, _, _) = models
    srv = start_server("--enable-lora", "--lora-modules", f"a4={r4}", "--max-model-len", "256",
                       "--num-kv-blocks", "32", model=str(base),
                       env_extra={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": ""})
    try:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = httpx.post(srv.base_url + path,
                                  json={"lora_name": "rt", "lora_path": str(r4)})
            assert response.status_code == 404, path
        assert httpx.post(srv.base_url + "/v1/completions",
                          json={**GREEDY, "model": "a4"}, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_lora_flags_are_checked_before_the_engine_starts(monkeypatch):
    import argparse

    from engine.entrypoints.serve_cmd import _lora_flag_problem

    def problem(**values):
        defaults = {"enable_lora": None, "lora_modules": None,
                    "allow_runtime_lora_updating": None}
        return _lora_flag_problem(argparse.Namespace(**{**defaults, **values}))

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    assert "--enable-lora" in problem(lora_modules=["a=/x"])
    assert "--enable-lora" in problem(allow_runtime_lora_updating=True)
    assert "name=path" in problem(enable_lora=True, lora_modules=["no-equals-sign"])
    assert "JSON" in problem(enable_lora=True, lora_modules=['{"name": "a"'])
    assert problem(enable_lora=True, lora_modules=['{"name": "a", "path": "/p"}']) is None
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")  # vLLM's switch
    args = argparse.Namespace(enable_lora=True, lora_modules=None,
                              allow_runtime_lora_updating=None)
    assert _lora_flag_problem(args) is None and args.allow_runtime_lora_updating is True


def test_the_openapi_document_has_the_runtime_routes(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert 400 in map(int, doc["paths"][path]["post"]["responses"]), path
