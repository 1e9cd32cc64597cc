"""Tool calling and reasoning through a live server and the official openai SDK (SmolLM2,
a ChatML template with Hermes-style tools): named and required tool choices always give
schema-valid calls, streamed and not; auto finds a Hermes call in real output; a full round
trip with a tool message; reasoning_content split from the answer; 400s for choices that
cannot be honored."""

from __future__ import annotations

import json
import os

import jsonschema
import openai
import pytest
from serve_fixtures import start_server

TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "chatml_tools.jinja")
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
CALL_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
             '"unit": "celsius", "days": 3}}\n</tool_call>')


@pytest.fixture(scope="module")
def client():
    server = start_server("--served-model-name", "m", "--max-model-len", "1024",
                          "--kv-cache-memory", "256m", "--chat-template", TEMPLATE,
                          "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                          "--reasoning-parser", "qwen3")
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                        timeout=120)
    server.stop()


def _check_calls(calls, names):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_the_template_renders_the_tools(client):
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=1,
                                           tool_choice="none")
    with_tools = client.chat.completions.create(model="m", messages=ASK, max_tokens=1,
                                                tools=TOOLS, tool_choice="none")
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert with_tools.choices[0].message.tool_calls is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_named_choice_always_gives_a_valid_call(client, temperature):
    out = client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, max_tokens=80, temperature=temperature, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    _check_calls(choice.message.tool_calls, ["get_weather"])
    assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_required_choice_gives_valid_calls_of_the_given_tools(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=120,
                                         temperature=0.8, seed=3, n=3, tool_choice="required")
    for choice in out.choices:  # complete calls, even where max_tokens cut a longer list
        _check_calls(choice.message.tool_calls, list(SCHEMAS))
        assert choice.finish_reason in ("tool_calls", "length")
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=120,
                                         temperature=0.8, seed=3, n=3, tool_choice="required",
                                         parallel_tool_calls=False)
    for choice in out.choices:
        _check_calls(choice.message.tool_calls, list(SCHEMAS))
        assert len(choice.message.tool_calls) == 1 and choice.finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_add_up_to_valid_calls(client, tool_choice):
    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS,
                                            max_tokens=120, temperature=0, stream=True,
                                            tool_choice=tool_choice)
    calls: dict[int, dict] = {}
    finish = None
    fragments = 0
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                if d.id is not None:
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
                fragments += 1
    assert finish == "tool_calls" and calls
    assert fragments > len(calls)  # arguments came in pieces, not in one final blob
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_finds_a_hermes_call_in_the_output(client):
    # The text is forced with a choice constraint, so the parser sees real engine output
    # holding one call; streamed and not.
    extra = {"structured_outputs": {"choice": [CALL_TEXT]}}
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=80,
                                         extra_body=extra)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius", "days": 3}
    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=80,
                                            extra_body=extra, stream=True)
    args, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                args += d.function.arguments or ""
    assert finish == "tool_calls" and json.loads(args)["city"] == "Paris"


def test_auto_without_a_call_is_plain_content(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=20,
                                         temperature=0,
                                         extra_body={"structured_outputs": {
                                             "regex": r"It is (sunny|rainy)\."}})
    choice = out.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content in ("It is sunny.", "It is rainy.")
    assert choice.finish_reason == "stop"


def test_round_trip_with_a_tool_message(client):
    first = client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"forecast": "sunny", "high": 21})},
    ]
    second = client.chat.completions.create(model="m", messages=history, tools=TOOLS,
                                            max_tokens=20, temperature=0, tool_choice="none")
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20  # the call and result
    with pytest.raises(openai.BadRequestError) as err:
        bad = [dict(h) for h in history]
        bad[1] = {"role": "assistant", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}
        client.chat.completions.create(model="m", messages=bad, max_tokens=2)
    assert err.value.body["param"] == "messages" and "not JSON" in err.value.body["message"]


def test_reasoning_content_is_split_from_the_answer(client):
    extra = {"structured_outputs": {"choice": ["<think>The user greets me.</think>\n\nHello!"]}}
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=40, extra_body=extra)
    message = out.choices[0].message
    assert message.reasoning_content == "The user greets me."
    assert message.content == "Hello!"
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=40, extra_body=extra, stream=True)
    reasoning, content = "", ""
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == ("The user greets me.", "Hello!")


@pytest.mark.parametrize("kwargs, param, words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"functions": [{"name": "f"}]}, "functions", "tools="),
])
def test_choices_that_cannot_be_honored_are_400s(client, kwargs, param, words):
    args = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 2, **kwargs}
    if args["tools"] is None:
        del args["tools"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{k: v for k, v in args.items() if k != "functions"},
                                       extra_body={"functions": args["functions"]}
                                       if "functions" in args else None)
    assert err.value.body["param"] == param and words in err.value.body["message"], \
        err.value.body
