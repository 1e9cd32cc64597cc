"""`engine plugins`: what platforms were discovered, from where, and which one runs and why.

Rule: this command only reports; it never changes which plugins are installed or loaded.
A failed selection is printed as the reason and gives exit status 1.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

_COLUMNS = ("name", "distribution", "available", "priority", "api", "capabilities")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plugins", help="List discovered platforms and show which one would be selected."
    )
    parser.add_argument(
        "--device", default=None,
        help="Platform to force, as `engine serve --device` would (default: the best one).",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from platforms.registry import choose_platform, discover

    try:
        infos = discover()
    except (RuntimeError, TypeError) as exc:  # a broken or clashing plugin: say which
        print(f"discovery failed: {exc}")
        return 1
    print(_table([_row(info) for info in infos]))
    for info in infos:
        if info.problem is not None:
            print(f"problem with {info.name}: {info.problem}")
    try:
        selection = choose_platform(_device(args))
    except (ValueError, RuntimeError) as exc:
        print(f"selected: none ({exc})")
        return 1
    print(f"selected: {selection.info.name} ({selection.reason})")
    return 0


def _device(args: argparse.Namespace) -> Optional[str]:
    return getattr(args, "device", None)


def _row(info: Any) -> tuple[str, ...]:
    capabilities = ", ".join(
        f"{key}={value}" for key, value in info.capabilities.items() if key != "priority"
    )
    return (
        info.name,
        info.distribution or "built-in",
        "yes" if info.available else "no",
        str(info.priority),
        str(info.api_version),
        capabilities,
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [_COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
