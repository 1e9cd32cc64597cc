"""The built-in parsers, and the two the server uses for tool_choice=required / named."""

from __future__ import annotations

import random
import string

from engine.tool_parsers.base import (
    ParsedOutput,
    PartialToolCall,
    ToolParser,
    held_back,
    parse_call_object,
    scan_value,
    skip_ws,
)


def _call_array(text: str, i: int, final: bool, out: ParsedOutput) -> None:
    """Calls of the JSON array starting at text[i] ('[') appended to `out.calls`."""
    if i >= len(text) or text[i] != "[":
        return
    i += 1
    while True:
        i = skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i >= len(text) or text[i] != "{":
            return
        call, end = parse_call_object(text, i, final)
        out.calls.append(call)
        if end is None:
            return
        i = end


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
    (Hermes 2/3, Qwen 2.5/3); the text before the first block is the content."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.start)
        if first < 0:
            keep = 0 if final else held_back(text, self.start)
            return ParsedOutput(text[:len(text) - keep])
        out = ParsedOutput(text[:first])
        i = first
        while i >= 0:
            j = skip_ws(text, i + len(self.start))
            if j >= len(text):
                break
            call, end = parse_call_object(text, j, final)
            out.calls.append(call)
            if end is None:
                break
            i = text.find(self.start, end)
        return out


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1-3.3 JSON tool calls: the output is `{"name": ..., "parameters": {...}}`
    (after an optional `<|python_tag|>`), several separated by `;`; output that does not
    begin with one is all content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = skip_ws(text, 0)
        if text.startswith(self.tag, i):
            i = skip_ws(text, i + len(self.tag))
        elif self.tag.startswith(text[i:]) and not final:
            return ParsedOutput("")  # maybe the tag, maybe not: wait
        if i >= len(text):
            return ParsedOutput("" if not final else text)
        if text[i] != "{":
            return ParsedOutput(text)
        out = ParsedOutput("")
        while i < len(text) and text[i] == "{":
            call, end = parse_call_object(text, i, final)
            out.calls.append(call)
            if end is None:
                break
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
        return out


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral tokenizers up to
    v7) and `[TOOL_CALLS]name[ARGS]{...}` (v11 on, repeated per call); the text before
    `[TOOL_CALLS]` is the content. Ids are 9 letters and digits, as Mistral's templates
    require."""

    name = "mistral"
    skip_special_tokens = False  # [TOOL_CALLS] is a special token
    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"

    def make_id(self) -> str:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.marker)
        if first < 0:
            keep = 0 if final else held_back(text, self.marker)
            return ParsedOutput(text[:len(text) - keep])
        out = ParsedOutput(text[:first])
        i = skip_ws(text, first + len(self.marker))
        if i < len(text) and text[i] == "[":
            _call_array(text, i, final, out)
            return out
        while i < len(text):  # name[ARGS]{...}, maybe again after another [TOOL_CALLS]
            args_at = text.find(self.args_marker, i)
            if args_at < 0:
                break  # the name is not finished
            call = PartialToolCall(name=text[i:args_at].strip())
            out.calls.append(call)
            start = skip_ws(text, args_at + len(self.args_marker))
            end = scan_value(text, start, final)
            call.arguments = text[start:end if end is not None else len(text)] or None
            if end is None:
                break
            call.complete = True
            i = skip_ws(text, end)
            if text.startswith(self.marker, i):
                i = skip_ws(text, i + len(self.marker))
            else:
                break
        return out


class JsonArrayToolParser(ToolParser):
    """What tool_choice="required" makes the model write: a JSON array of
    `{"name": ..., "parameters": {...}}` (the grammar admits nothing else)."""

    name = "json_array"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        out = ParsedOutput("")
        _call_array(text, skip_ws(text, 0), final, out)
        return out


class NamedToolParser(ToolParser):
    """What a named tool_choice makes the model write: the arguments object itself."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = skip_ws(text, 0)
        if start >= len(text):
            return ParsedOutput("", [PartialToolCall(self.function_name, complete=final)])
        end = scan_value(text, start, final)
        return ParsedOutput("", [PartialToolCall(
            self.function_name, text[start:end if end is not None else len(text)],
            complete=end is not None)])
