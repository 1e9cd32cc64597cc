"""Request fields the engine does not implement but that change what the client gets.

Rule: this table is the one place that lists them; a field here is refused with a 400 naming
it (never silently dropped), and a feature that lands removes its entry. Fields not listed
and not known are harmless extras: protocol.py logs them and carries on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.entrypoints.openai.errors import APIError

# field -> (is the value harmless?, what the client should know)
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (lambda v: not v, "the deprecated functions field is not implemented; "
                  "send the same definitions as tools=[{'type': 'function', 'function': ...}]"),
    "function_call": (lambda v: v in (None, "none"), "the deprecated function_call field is "
                      "not implemented; use tool_choice"),
    "suffix": (lambda v: v is None, "insertion (suffix) is not implemented"),
    "reasoning_effort": (lambda v: v is None, "reasoning effort is not implemented"),
}


def refuse_unsupported(fields: dict[str, Any]) -> None:
    """400 for the first field of `fields` (a request's values) that the table refuses."""
    for name, (harmless, why) in UNSUPPORTED_FIELDS.items():
        if name in fields and not harmless(fields[name]):
            raise APIError(400, f"{name}={fields[name]!r} is not supported by this server: "
                                f"{why}; remove the field.", param=name)
