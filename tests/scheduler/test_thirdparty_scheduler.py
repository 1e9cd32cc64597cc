"""A third-party scheduling policy, installed for real as its own distribution into a fresh
environment, is found through the `engine.schedulers` entry point and selected by name, with
zero changes to the engine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from platforms.testing import install_plugin_into_fresh_env

HERE = Path(__file__).parent / "thirdparty"


def test_an_installed_policy_is_selected_by_name_and_orders_the_requests(tmp_path, smollm2):
    python = install_plugin_into_fresh_env(HERE, tmp_path / "env")
    located = subprocess.check_output(
        [python, "-c", "import engine_demo_scheduler as m; print(m.__file__)"], text=True)
    assert "site-packages" in located and str(HERE) not in located  # the installed copy
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    proc = subprocess.run([python, str(HERE / "check_installed.py"), smollm2],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    order = json.loads(proc.stdout.strip().splitlines()[-1])["order"]
    # All five wait before the first step and the engine runs one at a time: shortest
    # prompt first (FCFS would give 0, 1, 2, 3, 4).
    assert order == [3, 1, 2, 4, 0]
