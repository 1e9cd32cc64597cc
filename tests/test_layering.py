"""The import graph of `engine/` follows its layering: no module imports a layer above its own.

Layers, lowest first (a module may import its own package and anything lower; two different
packages on one layer may not import each other). Imports under `if TYPE_CHECKING:` are
annotations only and do not count; every other import does, at module level or inside a
function alike.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parent.parent

LAYERS: list[set[str]] = [
    {"", "sampling_params"},  # "": the package root, whose exports are lazy
    {"messages"},  # what the layers exchange: a leaf
    {"reasoning", "tool_parsers"},  # text-only parsers of model output formats: leaves
    {"config"},  # the resolved, frozen configuration
    # Block bookkeeping (torch-free, imports nothing of the engine): below the models,
    # which plan their KV-cache groups with it.
    {"kv_cache"},
    {"distributed"},
    {"models"},
    {"lora"},  # adapters and their device slots: over the layers, bound by the worker
    {"engine_args", "worker"},
    {"tokenizer"},
    {"structured_outputs"},  # grammars: over the tokenizer, checked by inputs, run by the core
    {"scheduler", "executor", "outputs", "inputs"},
    {"engine_core", "metrics", "stats_logger"},
    {"entrypoints"},
    {"benchmarks"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
TORCH_FREE = ("messages", "scheduler", "kv_cache", "reasoning", "tool_parsers")


def _unit(module: str) -> Optional[str]:
    """The engine package a module belongs to ("" for `engine` itself), None outside."""
    parts = module.split(".")
    if parts[0] != "engine":
        return None
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(source: str) -> list[str]:
    """Modules `source` imports when it runs (relative ones as written, dots first)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # kept relative: reported, the engine imports absolutely
                found.append("." * node.level + (node.module or ""))
            elif node.module:
                found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """`src -> dst` lines for every import from a layer up (or across one layer), and for
    packages no layer names; `sources` maps module names to their text."""
    problems = []
    for module, text in sorted(sources.items()):
        src = _unit(module)
        if src not in RANK:
            problems.append(f"{module}: package {src!r} is on no layer (add it to LAYERS)")
            continue
        for imported in runtime_imports(text):
            if imported.startswith("."):
                problems.append(f"{module}: relative import {imported!r}")
                continue
            dst = _unit(imported)
            if dst is None or dst == src:
                continue
            if dst not in RANK or RANK[dst] >= RANK[src]:
                problems.append(f"{module} -> {imported}")
        if src in TORCH_FREE and any(i == "torch" or i.startswith("torch.")
                                     for i in runtime_imports(text)):
            problems.append(f"{module} imports torch ({src} must stay torch-free)")
    return problems


def _tree() -> dict[str, str]:
    return {_module_name(p): p.read_text(encoding="utf-8")
            for p in (REPO / "engine").rglob("*.py")}


def test_no_module_imports_a_layer_above_its_own():
    problems = violations(_tree())
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_a_planted_upward_import_is_caught():
    tree = _tree()
    planted = {
        "engine.scheduler.planted": "def f():\n    from engine.engine_core.core import EngineCore\n",
        "engine.messages.planted": "from engine.config import EngineConfig\n",
        "engine.kv_cache.planted": "import torch\n",
        "engine.newpkg.planted": "x = 1\n",
        "engine.worker.planted": "from engine.outputs import request_output\n",
        "engine.models.planted": "from ..scheduler import scheduler\n",
    }
    problems = violations({**tree, **planted})
    assert "engine.scheduler.planted -> engine.engine_core.core" in problems
    assert "engine.messages.planted -> engine.config" in problems
    assert any(p.startswith("engine.kv_cache.planted imports torch") for p in problems)
    assert any(p.startswith("engine.newpkg.planted: package 'newpkg'") for p in problems)
    assert "engine.worker.planted -> engine.outputs" in problems
    assert "engine.models.planted: relative import '..scheduler'" in problems
    # Annotations only do not count.
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.engine_core.core import X\n"
    assert not violations({"engine.scheduler.typed": typed})


# ---- the contract and the plugins stand apart from the engine ----
def engine_imports(source: str) -> list[str]:
    """Every import of `engine` or `engine.*` in `source`, annotations-only ones included:
    what a platform reads of the engine is `platforms.config`, so even a type is not needed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        found.extend(n for n in names if n == "engine" or n.startswith("engine."))
    return found


def _contract_and_plugin_sources() -> dict[str, str]:
    files = [*(REPO / "platforms").rglob("*.py"),
             *(p for pkg in (REPO / "plugins").glob("*/engine_*") for p in pkg.rglob("*.py"))]
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in files}


def test_the_contract_and_the_plugins_import_nothing_of_the_engine():
    sources = _contract_and_plugin_sources()
    assert any(path.startswith("plugins/cuda/engine_cuda/") for path in sources)
    problems = [f"{path}: {name}" for path, text in sorted(sources.items())
                for name in engine_imports(text)]
    assert not problems, "engine imports in platforms/ or a plugin:\n" + "\n".join(problems)


def test_a_planted_engine_import_in_a_plugin_is_caught():
    assert engine_imports("def f():\n    from engine.models.layers.attention import Attention\n"
                          ) == ["engine.models.layers.attention"]
    assert engine_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from engine.config import EngineConfig\n") == ["engine.config"]
    assert engine_imports("import engine\n") == ["engine"]
    assert engine_imports("import engine_cuda.ops\nfrom platforms import interface\n") == []
