"""`engine serve` end to end: a real server subprocess with SmolLM2, the official openai SDK."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from serve_fixtures import pid_alive, smollm2_path, start_server

MAX_MODEL_LEN = 1024
NAMES = ["smol", "smol-alias"]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    srv = start_server("--served-model-name", *NAMES, "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-num-seqs", "128", "--kv-cache-memory", "1g")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                      max_retries=0, timeout=120)


def _greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(model="smol", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0.0, **kw)


def test_models_list_shows_every_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == NAMES


def test_completion_from_string_token_ids_and_batch(client, server):
    text = _greedy(client)
    assert text.choices[0].text.strip()
    assert text.usage.prompt_tokens > 0 and text.usage.completion_tokens <= 12
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = _greedy(client, prompt=ids)
    assert by_ids.choices[0].text == text.choices[0].text
    batch = _greedy(client, prompt=[PROMPT, "One, two, three,"], max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == text.choices[0].text[: len(batch.choices[0].text)]
    alias = client.completions.create(model="smol-alias", prompt=PROMPT, max_tokens=2)
    assert alias.model == "smol-alias"


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0.0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.strip()
    assert 0 < resp.usage.completion_tokens <= 16


def test_streaming_completion_with_usage_matches_non_streaming(client):
    whole = _greedy(client, max_tokens=10)
    chunks = list(client.completions.create(
        model="smol", prompt=PROMPT, max_tokens=10, temperature=0.0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_first_delta_has_role(client):
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
        temperature=0.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()


def test_n_greater_than_one_with_seed_is_reproducible(client):
    def run():
        return client.completions.create(model="smol", prompt="Once upon a time", n=3,
                                         max_tokens=12, temperature=1.0, seed=1234)

    first, second = run(), run()
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # distinct child seeds


def test_logprobs(client):
    resp = _greedy(client, max_tokens=5, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == resp.usage.completion_tokens
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(abs(max(top.values()) - x) < 1e-4 for top, x in pairs)
    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        temperature=0.0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_echo_with_logprobs_gives_one_logprob_per_prompt_token(client):
    resp = _greedy(client, max_tokens=1, echo=True, logprobs=1)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == resp.usage.prompt_tokens + 1
    assert lp.token_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0.0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text


def test_stop_string_truncates_output(client):
    full = _greedy(client, max_tokens=16).choices[0].text
    words = re.findall(r"[A-Za-z]{3,}", full)
    assert words, full
    stop = words[-1]
    resp = _greedy(client, max_tokens=16, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]


def test_error_statuses_and_server_stays_up(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, prompt="hello " * (MAX_MODEL_LEN + 10))
    assert str(MAX_MODEL_LEN) in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, prompt="hi", max_tokens=MAX_MODEL_LEN)
    message = str(err.value)
    assert str(MAX_MODEL_LEN) in message and "max_tokens" in message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt="hi", temperature=-1.0)
    with pytest.raises(openai.BadRequestError) as err:  # FastAPI's 422 comes back as 400
        client.completions.create(model="smol", prompt="hi", extra_body={"max_tokens": "x"})
    assert err.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi")
    assert err.value.body["type"] == "NotFoundError"
    raw = httpx.post(server.base_url + "/v1/completions", json={"model": "smol"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param",
                                                                    "code"}
    # unknown fields are ignored, not rejected
    ok = _greedy(client, max_tokens=2, extra_body={"no_such_field": 1})
    assert ok.choices[0].text is not None


def test_utility_endpoints(server):
    base = server.base_url
    tokens = httpx.post(base + "/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(base + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith(PROMPT)
    assert httpx.get(base + "/version").json()["version"]
    ready = httpx.get(base + "/ready").json()
    assert ready["ready"] and "load" in ready["startup_timings"]
    assert httpx.get(base + "/openapi.json").json()["paths"]["/v1/completions"]
    assert httpx.get(base + "/docs").status_code == 200
    assert httpx.post(base + "/reset_prefix_cache").json() == {"reset": True}
    metrics = httpx.get(base + "/metrics").text
    for name in ("engine:prompt_tokens_total", "engine:generation_tokens_total",
                 "engine:time_to_first_token_seconds_bucket", "engine:request_success_total",
                 "engine:e2e_request_latency_seconds_count", "engine:prefix_cache_queries_total"):
        assert name in metrics


def test_32_concurrent_streams_finish_with_the_right_token_counts(aclient_factory):
    async def one(aclient, i):
        stream = await aclient.completions.create(
            model="smol", prompt=f"Request {i}: tell me a story.", max_tokens=8 + i % 8,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
        return usage.completion_tokens

    async def main():
        aclient = aclient_factory()
        counts = await asyncio.gather(*(one(aclient, i) for i in range(32)))
        await aclient.close()
        return counts

    assert asyncio.run(main()) == [8 + i % 8 for i in range(32)]


def test_greedy_text_equals_llm_generate(client):
    from engine import LLM, SamplingParams

    prompts = [PROMPT, "def fibonacci(n):"]
    served = [_greedy(client, prompt=p, max_tokens=24).choices[0].text for p in prompts]
    llm = LLM(model=smollm2_path(), max_model_len=MAX_MODEL_LEN)
    offline = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24),
                           use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing"
    return float(match.group(1))


def test_aborting_100_streams_frees_the_kv_cache(server, aclient_factory):
    async def one(aclient, i, started):
        stream = await aclient.completions.create(
            model="smol", prompt=f"Stream {i} counts:", max_tokens=400, temperature=0.0,
            stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _ in stream:
            received += 1
            if received == 2:
                break
        started.append(i)
        await stream.close()  # disconnect mid-way

    async def main():
        aclient = aclient_factory()
        started: list[int] = []
        await asyncio.gather(*(one(aclient, i, started) for i in range(100)))
        await aclient.close()
        return started

    assert len(asyncio.run(main())) == 100
    deadline = time.monotonic() + 60
    while True:
        metrics = httpx.get(server.base_url + "/metrics").text
        usage = _metric(metrics, "engine:kv_cache_usage_perc")
        running = _metric(metrics, "engine:num_requests_running")
        if (usage, running) == (0.0, 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (usage, running) == (0.0, 0.0)
    assert 'finished_reason="abort"' in metrics


def test_sigterm_shuts_down_cleanly_without_orphans(server):
    core_pid = httpx.get(server.base_url + "/ready").json()["engine_core_pid"]
    assert pid_alive(core_pid)
    assert server.stop() == 0, server.log()
    deadline = time.monotonic() + 45
    while pid_alive(core_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(core_pid)
    log = server.log()
    assert "Serving on http://127.0.0.1:" in log and "Startup:" in log
