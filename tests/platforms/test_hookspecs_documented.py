"""Every hook a plugin can implement is documented (parameters/return, an example) and has
a test that calls it through a real plugin."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from platforms import hookspecs

HOOKS = sorted(
    name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "engine_spec")
)
TESTS = Path(__file__).parent


def test_there_are_hooks():
    assert {"engine_platforms", "engine_kernels"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert "Return" in doc, f"{name}: say what it returns"
    assert "Example::" in doc and "@hookimpl" in doc, f"{name}: give an example hookimpl"
    assert len(doc.split()) >= 30, f"{name}: document it properly"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test_that_implements_it(name):
    implementing = [
        p.name for p in TESTS.rglob("test_*.py")
        if p.name != Path(__file__).name and f"def {name}(" in p.read_text()
    ]
    assert implementing, f"no test under {TESTS} implements the {name} hook"
