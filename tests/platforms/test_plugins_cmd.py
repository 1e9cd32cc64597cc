"""`engine plugins` run as users run it: a subprocess of the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

from platforms import registry


def run_plugins(*args: str, extra_env: Optional[dict[str, str]] = None):
    env = {k: v for k, v in os.environ.items()
           if k not in (registry.PLATFORM_ENV, registry.PLUGINS_ENV)}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "engine.entrypoints.cli", "plugins", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_table_and_choice():
    result = run_plugins()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["name", "distribution", "available", "priority", "api"]
    cpu_row = next(line for line in lines if line.startswith("cpu "))
    assert cpu_row.split()[:4] == ["cpu", "engine", "yes", "0"]
    assert "device_type=cpu" in cpu_row
    assert lines[-1] == "selected: cpu (highest priority among available: cpu (0))"


def test_device_flag_forces_and_unknown_fails():
    assert run_plugins("--device", "cpu").stdout.splitlines()[-1] == (
        "selected: cpu (forced by --device)"
    )
    result = run_plugins("--device", "nope")
    assert result.returncode == 1
    assert "Unknown platform 'nope'" in result.stdout


def test_shows_installed_plugin_and_env_choice(fake_distribution):
    path = os.pathsep.join([str(fake_distribution), os.environ.get("PYTHONPATH", "")])
    result = run_plugins(extra_env={"PYTHONPATH": path})
    assert "fakeaccel  engine-fakeplug  yes" in result.stdout
    assert "selected: fakeaccel (highest priority among available: cpu (0), fakeaccel (5))" in (
        result.stdout
    )
    forced = run_plugins(extra_env={"PYTHONPATH": path, registry.PLATFORM_ENV: "cpu"})
    assert forced.stdout.splitlines()[-1] == "selected: cpu (forced by ENGINE_PLATFORM)"
    hidden = run_plugins(extra_env={"PYTHONPATH": path, registry.PLUGINS_ENV: "cpu"})
    assert "fakeaccel" not in hidden.stdout


def test_broken_plugin_is_named_not_a_traceback(tmp_path):
    info = tmp_path / "engine_broken-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: engine-broken\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text("[engine.plugins]\nbroken = no_such_module_xyz\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = run_plugins(extra_env={"PYTHONPATH": path})
    assert result.returncode == 1
    assert "Plugin 'broken' (distribution engine-broken) failed to import" in result.stdout
    allowed = run_plugins(extra_env={"PYTHONPATH": path, registry.PLUGINS_ENV: "cpu"})
    assert allowed.returncode == 0  # the allow-list is the way around a broken plugin
