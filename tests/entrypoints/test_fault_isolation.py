"""Fault isolation: a request that fails inside the engine core ends alone, with an error its
client sees; every other request of the running batch completes and the core stays up.

The failing requests skip the API's admission checks (they are sent straight to a real core
process over ZMQ, or handed to AsyncLLM as already processed), so the failure happens where
the issue found it: inside the worker, mid-batch."""

from __future__ import annotations

import asyncio
import time

import pytest
from serve_fixtures import pid_alive, smollm2_path

from engine.engine_args import EngineArgs
from engine.engine_core.mp_client import SyncMPClient
from engine.messages.core import EngineCoreRequest, FinishReason
from engine.sampling_params import RequestOutputKind, SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314]
VOCAB = 49152  # SmolLM2


def _request(request_id: str, max_tokens: int, prompt=PROMPT, **params) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, list(prompt),
                             SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                            ignore_eos=True, **params),
                             eos_token_id=2, arrival_time=time.time())


BAD = {
    "bad-stop": dict(stop_token_ids=[-1]),
    "bad-bias": dict(logit_bias={99999999: 5.0}),
    "bad-prompt": dict(prompt=PROMPT + [VOCAB + 7]),
}


def test_bad_requests_fail_alone_while_fifteen_others_finish():
    args = EngineArgs(model=smollm2_path(), max_model_len=256, kv_cache_memory="64m")
    client = SyncMPClient(args, log_level="warning")
    try:
        client.wait_until_ready(timeout_s=300)
        pid = client.pid
        lengths = {f"good-{i}": 8 + i for i in range(15)}
        for req_id, n in list(lengths.items())[:8]:
            client.add_request(_request(req_id, n))
        # Let the first eight be running (decoding) before the bad ones arrive.
        tokens: dict[str, list[int]] = {r: [] for r in lengths}
        outcome: dict[str, FinishReason] = {}
        errors: dict[str, str] = {}
        last_stats = []

        def take(outputs) -> None:
            if outputs.scheduler_stats is not None:
                last_stats.append(outputs.scheduler_stats)
            for out in outputs.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    outcome[out.request_id] = out.finish_reason
                    if out.error:
                        errors[out.request_id] = out.error

        while not any(tokens.values()):
            take(client.get_output())
        for req_id, fields in BAD.items():
            fields = dict(fields)
            prompt = fields.pop("prompt", PROMPT)
            client.add_request(_request(req_id, 50, prompt=prompt, **fields))
        for req_id, n in list(lengths.items())[8:]:
            client.add_request(_request(req_id, n))
        deadline = time.monotonic() + 300
        while len(outcome) < len(lengths) + len(BAD) and time.monotonic() < deadline:
            take(client.get_output())

        for req_id, n in lengths.items():
            assert outcome.get(req_id) == FinishReason.LENGTH, req_id
            assert len(tokens[req_id]) == n, req_id
        # Greedy and alone-or-batched alike: every good request says the same thing.
        assert len({tuple(tokens[r][:8]) for r in lengths}) == 1
        for req_id in BAD:
            assert outcome.get(req_id) == FinishReason.ERROR, req_id
            assert tokens[req_id] == [], req_id  # nothing sampled from stand-in inputs
            assert "outside the vocabulary" in errors[req_id]
            assert "Traceback" not in errors[req_id]
        assert "stop_token_ids entry -1" in errors["bad-stop"]
        assert "logit_bias token id 99999999" in errors["bad-bias"]
        assert f"token id {VOCAB + 7}" in errors["bad-prompt"]

        # The step that finished the last request reported every block free.
        stats = last_stats[-1]
        assert stats.num_running_reqs == stats.num_waiting_reqs == 0
        assert stats.kv_cache_usage == 0.0
        # The core is the same process, and still serves.
        assert client.pid == pid and pid_alive(pid)
        client.add_request(_request("after", 4))
        after: list[int] = []
        while len(after) < 4:
            after += [t for o in client.get_output().outputs if o.request_id == "after"
                      for t in o.new_token_ids]
        assert after == tokens["good-0"][:4]
    finally:
        client.shutdown()


def test_async_llm_raises_request_failed_for_the_one_and_streams_the_rest():
    from engine.engine_core.async_llm import AsyncLLM, ProcessedPrompt
    from engine.outputs.request_output import RequestFailedError

    engine = None

    async def one(i: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        count = 0
        async for out in engine.generate("Hello there", params, f"r{i}"):
            count += len(out.outputs[0].token_ids)
        return count

    async def bad() -> str:
        # Already "processed": the admission check is skipped on purpose.
        prompt = ProcessedPrompt("x", PROMPT, SamplingParams(max_tokens=20,
                                                             stop_token_ids=[VOCAB]))
        with pytest.raises(RequestFailedError) as info:
            async for _ in engine.generate(prompt, None, "bad"):
                pass
        return str(info.value)

    async def main() -> tuple[list[int], str, bool, int]:
        nonlocal engine
        engine = AsyncLLM.start(EngineArgs(model=smollm2_path(), max_model_len=256,
                                           kv_cache_memory="64m"), log_level="warning")
        try:
            engine.begin()
            results = await asyncio.gather(*(one(i) for i in range(15)), bad())
            return list(results[:15]), results[15], engine.is_alive, engine.num_requests
        finally:
            engine.shutdown()

    counts, message, alive, pending = asyncio.run(main())
    assert counts == [6 + i for i in range(15)]
    assert "'bad'" in message and f"stop_token_ids entry {VOCAB}" in message
    assert alive and pending == 0
