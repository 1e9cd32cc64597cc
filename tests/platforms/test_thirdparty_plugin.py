"""A third-party platform plugin, installed for real as its own distribution into a fresh
environment, is discovered through the entry point, selected, and passes the conformance kit
with zero changes to `engine/` or `platforms/`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from platforms.testing import install_plugin_into_fresh_env

HERE = Path(__file__).parent / "thirdparty"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv that sees this environment's packages (torch, engine) through a .pth file,
    with engine-demo-accel pip-installed (not editable) into it."""
    return install_plugin_into_fresh_env(HERE, tmp_path_factory.mktemp("plugin-env"))


def test_demo_plugin_is_a_real_installed_distribution(plugin_env: Path):
    out = subprocess.check_output(
        [plugin_env, "-c", "import importlib.metadata as m; d = m.distribution('engine-demo-accel');"
         " print(d.locate_file('engine_demo_accel/__init__.py'))"], text=True)
    assert "site-packages" in out and str(HERE) not in out  # installed copy, not the source


def test_demo_plugin_passes_the_kit_and_matches_cpu(plugin_env: Path, smollm2: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env["VIRTUAL_ENV"] = str(plugin_env.parent.parent)
    proc = subprocess.run([plugin_env, str(HERE / "check_installed.py"), smollm2],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and len(result["tokens"]) == 4


def test_engine_plugins_lists_it_with_its_distribution(plugin_env: Path):
    engine_cli = [plugin_env, "-c", "import sys; from engine.entrypoints.cli import main; "
                  "sys.exit(main(['plugins']))"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    proc = subprocess.run(engine_cli, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo_accel" in proc.stdout and "engine-demo-accel" in proc.stdout
    assert "silu_and_mul" in proc.stdout  # its capabilities, kernels included
