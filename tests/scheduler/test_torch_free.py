"""The scheduler and KV-cache packages must import with torch unavailable."""

import subprocess
import sys
from pathlib import Path

_CODE = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import engine.kv_cache
import engine.kv_cache.manager
import engine.scheduler.scheduler
import engine.scheduler.policy
print("imported")
"""


def test_packages_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported"
