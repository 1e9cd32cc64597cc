"""Reasoning parsers: a thinking model's output -> its reasoning and its answer.

Rule: like the tool parsers, `parse(text, final, open_at_start)` reads the whole output so
far and returns (reasoning, content), both only growing, so a stream is the difference of
two parses. A parser names its markers (`start`, `end`); the engine core uses them to hold a
request's structured-output grammar back until the reasoning has ended, so the constraint
applies to the answer only. Built in: `deepseek_r1` (the output is reasoning until
`</think>`), `qwen3` (reasoning only inside `<think>...</think>`, opened by the output or left
open by the prompt); more from the `engine.reasoning_parsers` entry-point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Optional

ENTRY_POINT_GROUP = "engine.reasoning_parsers"


def _held_back(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    name = ""
    start = "<think>"
    end = "</think>"

    def opens_reasoning(self, prompt: str) -> bool:
        """Whether the output starts inside the reasoning (the prompt left it open)."""
        return prompt.rfind(self.start) > prompt.rfind(self.end)

    def parse(self, text: str, final: bool, open_at_start: bool) -> tuple[str, str]:
        """(reasoning, content) of the output so far; `final`: nothing more will come."""
        i = len(text) - len(text.lstrip())
        in_reasoning = open_at_start
        if text.startswith(self.start, i):
            in_reasoning, i = True, i + len(self.start)
        elif not final and self.start.startswith(text[i:]):
            return "", ""  # maybe the start marker: wait
        if not in_reasoning:
            return "", text
        end = text.find(self.end, i)
        if end < 0:
            keep = 0 if final else _held_back(text, self.end)
            return text[i:len(text) - keep], ""
        return text[i:end], text[end + len(self.end):].lstrip("\n")


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 and its distills: the template opens `<think>` in the prompt (older ones
    let the model write it), so the output is reasoning until `</think>`."""

    name = "deepseek_r1"

    def opens_reasoning(self, prompt: str) -> bool:
        return True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: reasoning inside `<think>...</think>` when the output opens it, or when the
    prompt leaves it open (thinking-only models); with enable_thinking=False the prompt
    closes an empty block and the output is all answer."""

    name = "qwen3"


_BUILTIN = {cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)}


def reasoning_parser_names() -> list[str]:
    return sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_reasoning_parser(name: str) -> ReasoningParser:
    cls: Optional[type] = _BUILTIN.get(name)
    if cls is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                cls = ep.load()
                break
    if cls is None:
        raise ValueError(f"unknown reasoning parser {name!r}; known: "
                         f"{', '.join(reasoning_parser_names())} (--reasoning-parser).")
    if not (isinstance(cls, type) and issubclass(cls, ReasoningParser)):
        raise ValueError(f"reasoning parser {name!r} ({cls!r}) is not a ReasoningParser.")
    return cls()


class ReasoningStreamer:
    """Stream deltas (reasoning, content) of a growing output."""

    def __init__(self, parser: ReasoningParser, open_at_start: bool) -> None:
        self._parser = parser
        self._open = open_at_start
        self.text = ""
        self._sent = (0, 0)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self._parser.parse(self.text, final, self._open)
        out = reasoning[self._sent[0]:], content[self._sent[1]:]
        self._sent = (max(self._sent[0], len(reasoning)), max(self._sent[1], len(content)))
        return out
