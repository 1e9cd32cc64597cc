"""CLI flags generated from `EngineArgs`, so `engine serve --flag` and `LLM(flag=...)` never drift.

Rule: one flag per `EngineArgs` field, named after it (`max_model_len` -> `--max-model-len`),
with the field's description as help text. Booleans get `--x/--no-x`.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Optional

from engine.engine_args import EngineArgs

# Short aliases users know from other engines.
_ALIASES = {"tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"],
            "scheduling_policy": ["--scheduler"]}


def _arg_type(annotation: Any) -> tuple[Any, Any]:
    """(argparse type, choices) for a pydantic field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _arg_type(inner[0]) if len(inner) == 1 else (str, None)
    if origin is typing.Literal:
        return str, list(args)
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    group = parser.add_argument_group("engine")
    for name, field in EngineArgs.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation in (bool, Optional[bool]):
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=f"{help_text} (default: "
                     f"{'the platform decides' if field.default is None else field.default})",
            )
            continue
        arg_type, choices = _arg_type(field.annotation)
        if name in ("max_model_len", "kv_cache_memory"):
            arg_type = str  # accepts 32k / 4g, parsed by EngineArgs
        default = None if field.is_required() else field.default
        group.add_argument(
            flag, *_ALIASES.get(name, []), dest=name, type=arg_type, choices=choices,
            default=None, help=f"{help_text} (default: {default})",
        )


def engine_args_from_namespace(ns: argparse.Namespace, **overrides: Any) -> EngineArgs:
    """EngineArgs from parsed flags; flags left unset keep the field defaults."""
    values = {
        name: getattr(ns, name)
        for name in EngineArgs.model_fields
        if getattr(ns, name, None) is not None
    }
    values.update(overrides)
    return EngineArgs(**values)
