"""Tool-call parsers on fixed model outputs: whole, and streamed one character at a time
(the stream's deltas must add up to the whole answer)."""

from __future__ import annotations

import json

import pytest

from engine.tool_parsers import (
    ToolCallStreamer,
    extract_tool_calls,
    get_tool_parser,
    tool_parser_names,
)
from engine.tool_parsers.parsers import JsonArrayToolParser, NamedToolParser

WEATHER = {"city": "Paris", "unit": "celsius", "days": [1, 2], "nested": {"a": "}{\"]"}}

# (parser, model output, expected content, expected [(name, arguments dict)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": '
     + json.dumps(WEATHER) + '}\n</tool_call>', None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n'
     '</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     "Let me check.\n", [("a", {"x": 1}), ("b", {})]),
    ("hermes", "The weather is nice < today.", "The weather is nice < today.", []),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {"x": 1</tool_call>',  # broken
     '<tool_call>\n{"name": "a", "arguments": {"x": 1</tool_call>', []),
    ("hermes", '<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>', None,
     [("a", {"x": 2})]),  # arguments given as a JSON string
    ("llama3_json", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}",
     None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; '
     '{"name": "b", "parameters": {"y": "z"}}', None, [("a", {"x": 1}), ("b", {"y": "z"})]),
    ("llama3_json", "Paris is sunny.", "Paris is sunny.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": '
     + json.dumps(WEATHER) + '}, {"name": "b", "arguments": {}}]', None,
     [("get_weather", WEATHER), ("b", {})]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS]{}',
     "Sure. ", [("get_weather", {"city": "Paris"}), ("b", {})]),
    ("mistral", "No tools needed [TOOL", "No tools needed [TOOL", []),
]


def _calls(extracted):
    return [(c.name, json.loads(c.arguments)) for c in extracted.tool_calls]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_output(name, text, content, calls):
    extracted = extract_tool_calls(get_tool_parser(name), text)
    assert _calls(extracted) == calls
    assert extracted.content == content
    ids = [c.id for c in extracted.tool_calls]
    assert len(set(ids)) == len(ids)


def _stream(parser, text, step=1):
    streamer = ToolCallStreamer(parser)
    content, calls = "", {}
    pieces = [text[i:i + step] for i in range(0, len(text), step)] + [""]
    for i, piece in enumerate(pieces):
        delta, tool_deltas = streamer.feed(piece, final=i == len(pieces) - 1)
        content += delta
        for d in tool_deltas:
            if "id" in d:
                assert d["index"] not in calls and d["index"] == len(calls)
                assert d["type"] == "function" and d["function"]["name"]
                calls[d["index"]] = [d["id"], d["function"]["name"], ""]
            calls[d["index"]][2] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("name,text,content,calls", [c for c in CASES if c[3]])
def test_stream_adds_up_to_the_whole(name, text, content, calls, step):
    streamed_content, streamed = _stream(get_tool_parser(name), text, step)
    assert streamed_content == (content or "")
    assert [(n, json.loads(a)) for _, n, a in streamed] == calls


def test_content_streams_before_the_call_and_holds_back_a_partial_marker():
    streamer = ToolCallStreamer(get_tool_parser("hermes"))
    assert streamer.feed("Hello <tool") == ("Hello ", [])  # '<tool' may open a call
    assert streamer.feed("_call>\n{\"name\": \"f\"") == ("", [
        {"index": 0, "id": streamer._ids[0], "type": "function",
         "function": {"name": "f", "arguments": ""}}])
    content, deltas = streamer.feed(', "arguments": {"a": ')
    assert content == "" and deltas == [{"index": 0, "function": {"arguments": '{"a": '}}]
    streamer2 = ToolCallStreamer(get_tool_parser("hermes"))
    assert streamer2.feed("a <t") == ("a ", [])
    assert streamer2.feed("x> c", final=True) == ("<tx> c", [])


def test_required_and_named_choice_parsers():
    text = '[{"name": "a", "parameters": {"x": [1, {"y": 2}]}}, {"name": "b", "parameters": {}}]'
    assert _calls(extract_tool_calls(JsonArrayToolParser(), text)) == [
        ("a", {"x": [1, {"y": 2}]}), ("b", {})]
    assert _stream(JsonArrayToolParser(), text)[1][0][1:] == ["a", '{"x": [1, {"y": 2}]}']
    named = extract_tool_calls(NamedToolParser("f"), ' {"q": "w"}')
    assert _calls(named) == [("f", {"q": "w"})] and named.content is None
    assert _stream(NamedToolParser("f"), '{"q": "w"}')[1][0][1:] == ["f", '{"q": "w"}']


def test_mistral_ids_are_nine_alphanumerics():
    extracted = extract_tool_calls(get_tool_parser("mistral"), '[TOOL_CALLS]f[ARGS]{}')
    (call,) = extracted.tool_calls
    assert len(call.id) == 9 and call.id.isalnum()


def test_unknown_parser_names_the_known_ones():
    assert {"hermes", "llama3_json", "mistral"} <= set(tool_parser_names())
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
