"""The `engine` command: `serve`, `bench`, `plugins`, `generate`, `chat`, `tokenizer`.

Rule: this file only dispatches. Each subcommand lives in its own module with a
`register(subparsers)` function, and imports its heavy dependencies only when run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

_SUBCOMMAND_MODULES = (
    "engine.entrypoints.serve_cmd",
    "engine.entrypoints.generate_cmd",
    "engine.benchmarks.cli",
    "engine.entrypoints.plugins_cmd",
    "engine.entrypoints.tokenizer_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="LLM inference and serving.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
