"""Tool parsers by name: the built-ins, then the `engine.tool_parsers` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from engine.tool_parsers.base import ToolParser
from engine.tool_parsers.parsers import HermesToolParser, Llama3JsonToolParser, MistralToolParser

ENTRY_POINT_GROUP = "engine.tool_parsers"
_BUILTIN: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)}


def tool_parser_names() -> list[str]:
    return sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_tool_parser(name: str) -> ToolParser:
    """A fresh parser called `name`; ValueError naming the known ones otherwise."""
    cls = _BUILTIN.get(name)
    if cls is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                cls = ep.load()
                break
    if cls is None:
        raise ValueError(f"unknown tool call parser {name!r}; known: "
                         f"{', '.join(tool_parser_names())} (--tool-call-parser).")
    if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
        raise ValueError(f"tool call parser {name!r} ({cls!r}) is not a ToolParser subclass.")
    return cls()
