"""Tools and reasoning in chat completions: what a request's `tools`/`tool_choice` ask of the
engine, and how each choice's raw text becomes `content`, `reasoning_content` and
`tool_calls`, whole or streamed.

Rule: `tool_choice="required"` and a named function are enforced by a grammar (a JSON schema
made from the tools), so those calls are always well-formed; `"auto"` lets the model write
what it likes and the server's `--tool-call-parser` finds calls after the fact; `"none"`
parses nothing. The reasoning parser (`--reasoning-parser`) splits first; tool calls are
looked for in the answer only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from engine.reasoning import ReasoningParser, ReasoningStreamer
from engine.sampling_params import InvalidParameter, StructuredOutputsParams
from engine.tool_parsers import (
    ToolCallStreamer,
    ToolParser,
    extract_tool_calls,
    get_tool_parser,
)
from engine.tool_parsers.parsers import JsonArrayToolParser, NamedToolParser


@dataclass
class ToolPlan:
    """What one request's tools mean: the tools for the chat template, the parser its
    output goes through (None: no tool calls), and the grammar that forces a call."""

    tools: Optional[list[dict[str, Any]]] = None
    parser: Optional[ToolParser] = None
    constraint: Optional[StructuredOutputsParams] = None


def plan_tools(tools: Optional[list[Any]], tool_choice: Any, parallel_tool_calls: Optional[bool],
               tool_call_parser: Optional[str]) -> ToolPlan:
    """The plan for a request's `tools` (pydantic models or dicts) and `tool_choice`; a 400
    (InvalidParameter) for a choice that cannot be honored."""
    tool_dicts = [t if isinstance(t, dict) else t.model_dump(exclude_none=True)
                  for t in (tools or [])]
    names = [t["function"]["name"] for t in tool_dicts]
    if tool_choice is None:
        tool_choice = "auto" if tool_dicts else "none"
    if not isinstance(tool_choice, str):
        tool_choice = tool_choice if isinstance(tool_choice, dict) else \
            tool_choice.model_dump(exclude_none=True)
    if tool_choice == "none":
        return ToolPlan(tools=tool_dicts or None)
    if not tool_dicts:
        raise InvalidParameter("tool_choice", f"tool_choice={tool_choice!r} needs tools; the "
                               "request has none.")
    if tool_choice == "auto":
        if tool_call_parser is None:
            raise InvalidParameter(
                "tool_choice", "tool_choice='auto' (the default when tools are given) needs "
                "the server to parse tool calls: start it with --tool-call-parser "
                "{hermes,llama3_json,mistral} (and --enable-auto-tool-choice), or send "
                "tool_choice='required', a named function, or 'none'.")
        return ToolPlan(tools=tool_dicts, parser=get_tool_parser(tool_call_parser))
    if tool_choice == "required":
        items = [{"type": "object", "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": _parameters(t)},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for t in tool_dicts]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": {"anyOf": items}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(tools=tool_dicts, parser=JsonArrayToolParser(),
                        constraint=StructuredOutputsParams(json=schema))
    name = (tool_choice.get("function") or {}).get("name") \
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise InvalidParameter("tool_choice", f"tool_choice={tool_choice!r}: it takes 'none', "
                               "'auto', 'required' or {'type': 'function', 'function': "
                               "{'name': ...}}.")
    if name not in names:
        raise InvalidParameter("tool_choice", f"tool_choice names the function {name!r}, which "
                               f"is not among the request's tools {names}.")
    tool = tool_dicts[names.index(name)]
    return ToolPlan(tools=tool_dicts, parser=NamedToolParser(name),
                    constraint=StructuredOutputsParams(json=_parameters(tool)))


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


class ChoiceOutput:
    """One choice's text through the reasoning parser, then the tool parser."""

    def __init__(self, reasoning: Optional[ReasoningParser], open_at_start: bool,
                 tools: Optional[ToolParser]) -> None:
        self._reasoning = reasoning
        self._open = open_at_start
        self._tools = tools
        self._reasoning_stream = ReasoningStreamer(reasoning, open_at_start) \
            if reasoning is not None else None
        self._tool_stream = ToolCallStreamer(tools) if tools is not None else None

    def message(self, text: str) -> dict[str, Any]:
        """The non-streamed message fields: content, and reasoning_content / tool_calls."""
        out: dict[str, Any] = {}
        content: Optional[str] = text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.parse(text, True, self._open)
            out["reasoning_content"] = reasoning or None
        if self._tools is not None:
            extracted = extract_tool_calls(self._tools, content or "")
            if extracted.tool_calls:
                out["tool_calls"] = [c.to_openai() for c in extracted.tool_calls]
                content = extracted.content
        return {"role": "assistant", "content": content, **out}

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """The stream delta for `text` more (final: the choice has finished)."""
        out: dict[str, Any] = {}
        content = text
        if self._reasoning_stream is not None:
            reasoning, content = self._reasoning_stream.feed(text, final)
            if reasoning:
                out["reasoning_content"] = reasoning
        if self._tool_stream is not None:
            content, calls = self._tool_stream.feed(content, final)
            if calls:
                out["tool_calls"] = calls
        if content:
            out["content"] = content
        return out

    @property
    def called_tools(self) -> bool:
        return self._tool_stream is not None and self._tool_stream.num_calls > 0


def finish_reason(reason: Optional[str], message: dict[str, Any]) -> Optional[str]:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if reason == "stop" and message.get("tool_calls") else reason
