"""Serving pieces without a model: wire framing, request models, metrics."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.engine_core.transport import (
    OutputType,
    RequestType,
    UtilityCall,
    decode_output,
    decode_request,
    encode,
)
from engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from engine.messages.core import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
)
from engine.metrics import EngineMetrics
from engine.outputs.request_output import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams


def test_wire_frames_round_trip():
    request = EngineCoreRequest("r1", [1, 2, 3], SamplingParams(temperature=0.0, stop="x"),
                                eos_token_id=2, arrival_time=1.5, priority=3)
    tag, decoded = decode_request(encode(RequestType.ADD, request))
    assert tag is RequestType.ADD and decoded == request
    assert decode_request(encode(RequestType.ABORT, ["a", "b"])) == (RequestType.ABORT,
                                                                      ["a", "b"])
    call = UtilityCall(7, "reset_prefix_cache", [])
    assert decode_request(encode(RequestType.UTILITY, call))[1] == call
    outputs = EngineCoreOutputs(
        outputs=[EngineCoreOutput("r1", [5], finish_reason=FinishReason.LENGTH)],
        scheduler_stats=SchedulerStats(num_running_reqs=1, kv_cache_usage=0.25),
        timestamp=3.0)
    tag, back = decode_output(encode(OutputType.OUTPUTS, outputs))
    assert tag is OutputType.OUTPUTS and back == outputs
    with pytest.raises(ValueError):
        decode_request([b"\x09", b""])  # unknown tag


def test_completion_request_prompts_and_params(caplog):
    defaults = SamplingParams(temperature=0.6, top_p=0.9)
    with caplog.at_level(logging.WARNING):
        req = CompletionRequest(prompt=[[1, 2], [3]], temperature=0.0, stream=True,
                                logit_bias={"5": 1.5}, surprise=1)
    assert "surprise" in caplog.text
    assert req.prompts() == [[1, 2], [3]]
    assert CompletionRequest(prompt=[4, 5]).prompts() == [[4, 5]]
    params = req.to_sampling_params(defaults, req.max_tokens, logprobs=2, echo_logprobs=True)
    assert params.temperature == 0.0 and params.top_p == 0.9  # unset -> model default
    assert params.logit_bias == {5: 1.5} and params.prompt_logprobs == 2
    assert params.output_kind == RequestOutputKind.DELTA and params.max_tokens == 16
    with pytest.raises(ValueError, match="logit_bias"):
        CompletionRequest(prompt="x", logit_bias={"a": 1.0}).to_sampling_params(
            defaults, 4, None, False)


def test_chat_request_prefers_max_completion_tokens():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=5, max_completion_tokens=9)
    assert req.effective_max_tokens == 9
    from engine.inputs import template_message

    message = template_message(req.messages[0].model_dump(exclude_none=True))
    assert message == {"role": "user", "content": "a\nb"}  # parts joined as chat joins them


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"model_name": "m", **labels})
    assert value is not None, name
    return value


def test_metrics_from_stats_and_outputs():
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, "m")
    metrics.on_scheduler_stats(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1,
                                              kv_cache_usage=0.5, prefix_cache_queries=32,
                                              prefix_cache_hits=16, num_prompt_tokens=40,
                                              num_generation_tokens=3, num_preemptions=1))
    metrics.on_scheduler_stats(SchedulerStats(num_generation_tokens=2))
    assert _value(registry, "engine:num_requests_running") == 0  # gauges follow the last
    assert _value(registry, "engine:generation_tokens_total") == 5  # counters add deltas
    assert _value(registry, "engine:prefix_cache_hits_total") == 16
    req_metrics = RequestMetrics(arrival_time=100.0, first_token_time=100.5,
                                 first_scheduled_time=100.25)

    def out(tokens, finished):
        completion = CompletionOutput(0, "x", tokens, finish_reason="length" if finished
                                      else None)
        return RequestOutput("r", None, [1], None, [completion], finished, req_metrics)

    metrics.on_request_output(out([7], False), now=100.5)
    metrics.on_request_output(out([8, 9], True), now=101.5)
    assert _value(registry, "engine:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert _value(registry, "engine:inter_token_latency_seconds_count") == 2
    assert _value(registry, "engine:inter_token_latency_seconds_sum") == pytest.approx(1.0)
    assert _value(registry, "engine:e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert _value(registry, "engine:request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert _value(registry, "engine:request_success_total", finished_reason="length") == 1
    assert b"engine:kv_cache_usage_perc" in generate_latest(registry)


def test_expert_load_is_a_counter_per_expert_and_crosses_the_wire():
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, "m")
    metrics.on_scheduler_stats(SchedulerStats(num_generation_tokens=1))  # no load: no series
    assert b'expert="' not in generate_latest(registry)
    metrics.on_scheduler_stats(SchedulerStats(expert_load=[3, 0, 5]))
    metrics.on_scheduler_stats(SchedulerStats(expert_load=[1, 2, 0]))
    assert [_value(registry, "engine:moe_expert_tokens_total", expert=str(e))
            for e in range(3)] == [4, 2, 5]
    assert b'engine:moe_expert_tokens_total{expert="2",model_name="m"} 5.0' in \
        generate_latest(registry)
    frames = encode(OutputType.OUTPUTS, EngineCoreOutputs(
        scheduler_stats=SchedulerStats(num_running_reqs=1, expert_load=[7, 8])))
    _, decoded = decode_output(frames)
    assert decoded.scheduler_stats.expert_load == [7, 8]


def test_a_request_failed_in_the_engine_is_a_500_in_the_openai_shape_and_a_last_sse_event():
    import asyncio
    import json

    from engine.entrypoints.openai.api_server import _guard_stream, _stream_error
    from engine.outputs.request_output import RequestFailedError

    exc = RequestFailedError("cmpl-1", "ValueError: token id 7 is outside the vocabulary")
    body = _stream_error(exc)
    assert body["error"]["code"] == 500 and body["error"]["type"] == "InternalServerError"
    assert "outside the vocabulary" in body["error"]["message"]
    assert "'cmpl-1'" in body["error"]["message"]

    async def lines():
        yield "data: {}\n\n"
        raise exc

    async def collect():
        return [line async for line in _guard_stream(lines())]

    out = asyncio.run(collect())
    assert out[-1].strip() == "data: [DONE]"
    assert json.loads(out[-2].removeprefix("data: "))["error"]["code"] == 500
