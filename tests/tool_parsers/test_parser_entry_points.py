"""Tool-call and reasoning parsers from another distribution, through the entry-point groups
`engine.tool_parsers` and `engine.reasoning_parsers`: a package and its `.dist-info` (what
pip writes) on the path of a fresh interpreter, found by importlib.metadata, used by name
as the built-ins are, and `engine serve --tool-call-parser` accepts the name. An entry point
that is not a parser class is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGE = '''
from engine.reasoning import ReasoningParser
from engine.tool_parsers.base import ParsedOutput, PartialToolCall, ToolParser


class BangToolParser(ToolParser):
    """`!name {json}` on one line per call."""

    name = "bang"

    def parse(self, text, final):
        content, _, rest = text.partition("!")
        if not rest:
            return ParsedOutput(text)
        calls = []
        for line in ("!" + rest).splitlines():
            name, _, arguments = line[1:].partition(" ")
            calls.append(PartialToolCall(name=name, arguments=arguments or "{}",
                                         complete=True))
        return ParsedOutput(content, calls)


class BracketReasoningParser(ReasoningParser):
    name = "brackets"
    start, end = "[[", "]]"


NOT_A_PARSER = object()
'''

ENTRY_POINTS = '''
[engine.tool_parsers]
bang = demo_parsers:BangToolParser
broken = demo_parsers:NOT_A_PARSER

[engine.reasoning_parsers]
brackets = demo_parsers:BracketReasoningParser
'''

CHECK = '''
from engine.reasoning import get_reasoning_parser, reasoning_parser_names
from engine.tool_parsers import extract_tool_calls, get_tool_parser, tool_parser_names

assert "bang" in tool_parser_names() and "hermes" in tool_parser_names()
result = extract_tool_calls(get_tool_parser("bang"), 'Sure.!get_weather {"city": "Paris"}')
assert result.content == "Sure." and [(c.name, c.arguments) for c in result.tool_calls] == \\
    [("get_weather", '{"city": "Paris"}')], result
assert "brackets" in reasoning_parser_names()
assert get_reasoning_parser("brackets").parse("[[hmm]]yes", True, False) == ("hmm", "yes")
try:
    get_tool_parser("broken")
except ValueError as exc:
    assert "broken" in str(exc) and "not a ToolParser" in str(exc), exc
else:
    raise AssertionError("a non-parser entry point was accepted")
print("ok")
'''


def _site(tmp_path) -> str:
    site = tmp_path / "site"
    (site / "demo_parsers").mkdir(parents=True)
    (site / "demo_parsers" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    info = site / "demo_parsers-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-parsers\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return str(site)


def _env(site: str) -> dict[str, str]:
    path = os.pathsep.join([site, REPO, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_parsers_from_another_distribution(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECK], env=_env(_site(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_serve_takes_a_plugin_parser_and_refuses_an_unknown_one(tmp_path):
    """The name check runs before the model loads: an unknown name exits with the known ones
    listed (the plugin's among them)."""
    env = _env(_site(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "serve",
                           "no-such-model", "--tool-call-parser", "nope"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "bang" in proc.stderr, proc.stderr
