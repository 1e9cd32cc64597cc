"""LoRA adapters on the client side: the cheap checks before a request reaches the core, and
the server's table of adapters by name.

Rule: the client refuses what it can see without reading weights (adapter_config.json
missing or unreadable, a peft option we do not run, rank above --max-lora-rank, a
target_modules name the model has no linear layer for) with a ValueError naming the number
and the flag; the worker reads the weights and checks the rest (shapes, tensor names), and
fails only that request. An id always means one directory: the worker caches adapters by
`lora_int_id`, so an id reused for another path would run the old weights.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from engine.config import EngineConfig
from engine.messages.core import LoRARequest


class AdapterChecker:
    """Checks adapter directories against one engine's LoRA config and model."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._leaf_names: Optional[list[str]] = None
        self._paths: dict[int, str] = {}  # lora_int_id -> its directory, once checked

    def check_enabled(self, flag: str = "enable_lora=True") -> None:
        if self.config.lora is None:
            raise ValueError(f"A LoRA adapter was requested but LoRA is off; start the "
                             f"engine with {flag}.")

    def check_request(self, request: LoRARequest) -> None:
        """ValueError unless LoRA is on, the id keeps its path and the directory passes."""
        self.check_enabled()
        known = self._paths.get(request.lora_int_id)
        if known is not None:
            if known != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already used for "
                                 f"{known!r}; give {request.lora_path!r} another id (an id "
                                 "always means one adapter).")
            return
        self.check_directory(request.lora_path)
        self._paths[request.lora_int_id] = request.lora_path

    def check_directory(self, path: str) -> int:
        """The adapter's rank, after the checks that need no weights."""
        self.check_enabled()
        assert self.config.lora is not None
        from engine.lora.adapter import read_adapter_config

        try:
            adapter = read_adapter_config(path, self.config.lora.max_lora_rank)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"LoRA adapter {path!r}: adapter_config.json cannot be read "
                             f"({exc}).") from None
        if isinstance(adapter.target_modules, list):
            known = self._model_leaf_names()
            for name in adapter.target_modules:
                if known and name.rpartition(".")[2] not in known:
                    raise ValueError(
                        f"LoRA adapter {path!r} targets module {name!r}, which this model "
                        f"does not have as a linear layer (LoRA-capable: "
                        f"{', '.join(known)}).")
        return adapter.rank

    def _model_leaf_names(self) -> list[str]:
        """The model's LoRA-capable module names, from the architecture built on the meta
        device (allocates nothing); empty when it cannot be built here (the worker checks)."""
        if self._leaf_names is None:
            self._leaf_names = []
            try:
                import torch

                from engine.lora.adapter import LoRATargets
                from engine.models.registry import get_model_class

                model = self.config.model
                with torch.device("meta"):
                    built = get_model_class(model.architecture)(model.hf_config)
                self._leaf_names = LoRATargets(built).leaf_names
            except Exception:  # noqa: BLE001 - best effort; the worker checks by tensor
                self._leaf_names = []
        return self._leaf_names


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` entry (vLLM's names)."""

    name: str
    path: str
    base_model_name: Optional[str] = None


def parse_lora_module(value: str) -> LoRAModule:
    """`name=path` or vLLM's JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
    text = value.strip()
    if text.startswith("{"):
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules {value!r} is not valid JSON ({exc}).") from None
        if not isinstance(raw, dict) or not raw.get("name") or not raw.get("path"):
            raise ValueError(f"--lora-modules {value!r}: the JSON form needs \"name\" and "
                             "\"path\".")
        return LoRAModule(str(raw["name"]), str(raw["path"]), raw.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {value!r}: write name=path or the JSON form "
                         "'{\"name\": ..., \"path\": ...}'.")
    return LoRAModule(name, path)


class LoRARegistry:
    """The server's adapters by name; ids are given from 1 in order and never reused, so a
    name loaded again after an unload is a new adapter (no stale weights, no shared cache).

    Unloading removes the name for new requests only: requests already running keep their
    LoRARequest and finish with the adapter (as vLLM does)."""

    def __init__(self, checker: AdapterChecker, base_model_name: str) -> None:
        self.checker = checker
        self.base_model_name = base_model_name
        self._by_name: dict[str, tuple[LoRARequest, str]] = {}  # name -> (request, parent)
        self._ids = itertools.count(1)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: Optional[str]) -> Optional[LoRARequest]:
        entry = self._by_name.get(name) if name is not None else None
        return None if entry is None else entry[0]

    def names(self) -> list[str]:
        return list(self._by_name)

    def entries(self) -> list[tuple[LoRARequest, str]]:
        """(request, parent model name) per adapter, in load order."""
        return list(self._by_name.values())

    def add(self, name: str, path: str, base_model_name: Optional[str] = None,
            reserved: Union[list[str], tuple[str, ...]] = ()) -> LoRARequest:
        """Check the directory and register it (ValueError naming the problem)."""
        if not name:
            raise ValueError("lora_name is empty.")
        if name in self._by_name or name in reserved:
            raise ValueError(f"The name {name!r} is already served; unload it first or pick "
                             "another lora_name.")
        if not os.path.isdir(path):
            raise ValueError(f"LoRA adapter path {path!r} is not a directory.")
        self.checker.check_directory(path)
        request = LoRARequest(name, next(self._ids), path)
        self._by_name[name] = (request, base_model_name or self.base_model_name)
        return request

    def remove(self, name: str) -> LoRARequest:
        entry = self._by_name.pop(name, None)
        if entry is None:
            raise KeyError(name)
        return entry[0]
