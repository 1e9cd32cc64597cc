"""`engine serve --async-scheduling` (the GPU default) end to end on CPU: concurrent greedy
completions equal the one-step-at-a-time engine's, a stream cut by the client is aborted
while its batches are in flight, and the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from serve_fixtures import smollm2_path, start_server

from engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "One, two, three,", "def add(a, b):"]


@pytest.fixture(scope="module")
def server():
    srv = start_server("--async-scheduling", "--served-model-name", "smol",
                       "--max-model-len", "512", "--kv-cache-memory", "256m")
    yield srv
    srv.stop()


def test_async_server_matches_sync_engine_and_survives_a_cut_stream(server):
    ids = [httpx.post(server.base_url + "/tokenize", json={"prompt": p}).json()["tokens"]
           for p in PROMPTS]
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                max_retries=0, timeout=120)

    async def complete(prompt_ids):
        out = await client.completions.create(model="smol", prompt=prompt_ids,
                                              max_tokens=20, temperature=0.0)
        return out.choices[0].text

    async def cut_stream():
        stream = await client.completions.create(model="smol", prompt=ids[0],
                                                 max_tokens=200, temperature=0.0, stream=True)
        async for _ in stream:
            break  # leave after the first chunk: the server aborts the request
        await stream.close()

    async def main():
        texts = await asyncio.gather(*(complete(i) for i in ids), cut_stream())
        again = await complete(ids[1])
        return texts[:3], again

    texts, again = asyncio.run(main())
    assert "async scheduling: on" in server.log()
    llm = LLM(model=smollm2_path(), async_scheduling=False, max_model_len=512,
              num_kv_blocks=64)
    expected = [o.outputs[0].text for o in llm.generate(
        [{"prompt_token_ids": i} for i in ids],
        SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)]
    assert texts == expected
    assert again == expected[1]
