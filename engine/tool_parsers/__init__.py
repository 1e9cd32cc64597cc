"""Tool-call parsers: a model's raw output text -> its content and OpenAI tool calls.

Rule: a parser is one method, `parse(text, final)`, over the whole output so far. It returns
the content that is surely not part of a call and the calls begun, each with its name once
its JSON string is complete and the raw JSON text of its arguments so far. Both only grow as
text arrives, so a stream is the difference between two parses (`ToolCallStreamer`) and the
answer is the parse of the whole text (`extract_tool_calls`). Built in: `hermes` (Qwen,
Hermes: `<tool_call>{...}</tool_call>`), `llama3_json` (Llama 3.x: a bare JSON object, or
`<|python_tag|>`), `mistral` (`[TOOL_CALLS][...]` and `[TOOL_CALLS]name[ARGS]{...}`); more
come from the `engine.tool_parsers` entry-point group (name -> a `ToolParser` subclass).
"""

from __future__ import annotations

from engine.tool_parsers.base import (
    ExtractedToolCalls,
    ParsedOutput,
    PartialToolCall,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    extract_tool_calls,
)
from engine.tool_parsers.registry import get_tool_parser, tool_parser_names

__all__ = [
    "ExtractedToolCalls", "ParsedOutput", "PartialToolCall", "ToolCall", "ToolCallStreamer",
    "ToolParser", "extract_tool_calls", "get_tool_parser", "tool_parser_names",
]
