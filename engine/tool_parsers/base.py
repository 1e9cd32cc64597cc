"""The parser interface, the prefix-JSON scanner parsers share, and the stream differ."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

_WHITESPACE = " \t\r\n"
# Keys a call object names its arguments by (OpenAI/Hermes/Mistral, Llama 3).
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PartialToolCall:
    """A call as far as the text goes: `name` once its string is complete; `arguments`,
    the raw JSON text of the arguments so far (None while it cannot be streamed yet: not
    begun, or a JSON string that is only usable once complete); `complete` when the call
    object has ended."""

    name: Optional[str] = None
    arguments: Optional[str] = None
    complete: bool = False


@dataclass
class ParsedOutput:
    content: str
    calls: list[PartialToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedToolCalls:
    content: Optional[str]
    tool_calls: list[ToolCall]


class ToolParser:
    """Finds tool calls in one model family's output format."""

    name: str = ""
    # Whether the output must keep special tokens (a call marker that is one).
    skip_special_tokens: bool = True

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content and calls in `text`; with `final`, nothing more will come."""
        raise NotImplementedError

    def make_id(self) -> str:
        return "call_" + uuid.uuid4().hex[:24]


def extract_tool_calls(parser: ToolParser, text: str) -> ExtractedToolCalls:
    """The finished output's content and calls. A call that is not a complete object with a
    name and JSON-object arguments makes the whole output content: the client sees what
    the model wrote, never a call the engine guessed."""
    parsed = parser.parse(text, final=True)
    calls = []
    for call in parsed.calls:
        arguments = normalized_arguments(call)
        if arguments is None or not call.name:
            return ExtractedToolCalls(text, [])
        calls.append(ToolCall(parser.make_id(), call.name, arguments))
    return ExtractedToolCalls(parsed.content or None if calls else parsed.content, calls)


def normalized_arguments(call: PartialToolCall) -> Optional[str]:
    """The complete call's arguments as JSON-object text, or None if they are not one."""
    if not call.complete or call.arguments is None:
        return None
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return None
    return call.arguments if isinstance(value, dict) else None


class ToolCallStreamer:
    """Turns a growing output into OpenAI stream deltas: new content, and `delta.tool_calls`
    entries (the first for a call carries its index, id, type and name; the next ones
    fragments of its arguments text)."""

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self.text = ""
        self._content_sent = 0
        self._ids: list[str] = []
        self._args_sent: list[int] = []

    @property
    def num_calls(self) -> int:
        return len(self._ids)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        parsed = self._parser.parse(self.text, final)
        content = parsed.content[self._content_sent:]
        self._content_sent = max(self._content_sent, len(parsed.content))
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(parsed.calls):
            if index == len(self._ids):
                if not call.name:
                    break  # calls are announced in order, each once its name is known
                self._ids.append(self._parser.make_id())
                self._args_sent.append(0)
                deltas.append({"index": index, "id": self._ids[index], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            arguments = call.arguments or ""
            if len(arguments) > self._args_sent[index]:
                fragment = arguments[self._args_sent[index]:]
                self._args_sent[index] = len(arguments)
                if deltas and deltas[-1]["index"] == index:
                    deltas[-1]["function"]["arguments"] += fragment
                else:
                    deltas.append({"index": index, "function": {"arguments": fragment}})
        return content, deltas


# --- a scanner for JSON that may stop anywhere ----------------------------------------

def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def scan_string(text: str, i: int) -> Optional[int]:
    """End (exclusive) of the JSON string opening at text[i] == '"'; None if unfinished."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def scan_value(text: str, i: int, final: bool) -> Optional[int]:
    """End (exclusive) of the JSON value starting at text[i]; None if it is unfinished (a
    bare scalar at the very end is unfinished unless `final`). Malformed text ends the
    value where it stops making sense; json.loads then judges it."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = scan_string(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in _WHITESPACE + ",}]":
        j += 1
    if j == len(text) and not final:
        return None
    return j if j > i else i + 1


def parse_call_object(text: str, i: int, final: bool,
                      name_keys: tuple[str, ...] = ("name",)
                      ) -> tuple[PartialToolCall, Optional[int]]:
    """The call object starting at text[i] ('{'): its name, arguments so far, and its end
    (None while unfinished, or where it stops being a call object)."""
    call = PartialToolCall()
    if i >= len(text) or text[i] != "{":
        return call, None
    i += 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return call, None
        if text[i] == "}":
            call.complete = True
            return call, i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return call, None
        key_end = scan_string(text, i)
        if key_end is None:
            return call, None
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return call, None
        i = skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return call, None
        start = skip_ws(text, i + 1)
        end = scan_value(text, start, final)
        if key in name_keys:
            if end is None:
                return call, None
            try:
                name = json.loads(text[start:end])
            except ValueError:
                return call, None
            call.name = name if isinstance(name, str) else None
        elif key in ARGUMENT_KEYS:
            if start < len(text) and text[start] == '"':  # arguments as a JSON string
                if end is not None:
                    try:
                        call.arguments = str(json.loads(text[start:end]))
                    except ValueError:
                        return call, None
            elif start < len(text):
                call.arguments = text[start:end if end is not None else len(text)]
        if end is None:
            return call, None
        i = end


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker` (held back
    from the content until the next text says)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
