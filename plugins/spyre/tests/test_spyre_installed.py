"""engine-spyre pip-installed (not editable) into a fresh environment: found through its
`engine.plugins` entry point, not selected without the card, listed by `engine plugins` with
its capabilities, and selected (and passing a conformance check) with the CPU stand-in."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from platforms.testing import install_plugin_into_fresh_env

PLUGIN = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.metadata as m, json
import engine_spyre
from platforms.registry import choose_platform
from platforms.testing import ATTENTION_CASES, check_attention_against_reference
eps = {e.name: e for e in m.entry_points(group="engine.plugins")}
sel = choose_platform()
out = {"module": engine_spyre.__file__, "dist": eps["spyre"].dist.name,
       "value": eps["spyre"].value, "selected": sel.info.name, "reason": sel.reason}
if sel.info.name == "spyre":
    out["max_err"] = check_attention_against_reference(sel.platform, ATTENTION_CASES[3])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv seeing this environment's packages (torch, engine) through a .pth file, with
    engine-spyre installed from its source folder as a regular wheel install."""
    return install_plugin_into_fresh_env(PLUGIN, tmp_path_factory.mktemp("spyre-env"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env.update(extra)
    return env


def _probe(python: Path, **extra: str) -> dict:
    proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                          env=_env(**extra), cwd="/")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_installed_copy_is_found_through_the_entry_point_and_not_selected(plugin_python):
    out = _probe(plugin_python)
    assert out["dist"] == "engine-spyre" and out["value"] == "engine_spyre"
    assert str(plugin_python.parent.parent) in out["module"]  # the installed copy
    assert str(PLUGIN) not in out["module"]
    assert out["selected"] != "spyre"  # no card here, no simulation asked for


def test_simulated_it_is_selected_and_passes_the_kit(plugin_python):
    out = _probe(plugin_python, ENGINE_SPYRE_SIMULATE="1")
    assert out["selected"] == "spyre", out
    assert out["max_err"] < 1e-4


def test_engine_plugins_lists_it_with_capabilities(plugin_python):
    cmd = [plugin_python, "-c", "import sys; from engine.entrypoints.cli import main; "
           "sys.argv = ['engine', 'plugins']; sys.exit(main())"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd="/")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("spyre "))
    assert "engine-spyre" in line and " no " in line
    assert "warmup_shapes=4x64x20" in line and "scheduling=static batches" in line
