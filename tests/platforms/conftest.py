"""Fixtures for platform tests: a clean environment and a throw-away plugin distribution.

The distribution is real as far as discovery goes: a `*.dist-info` folder with METADATA and
an `entry_points.txt` on sys.path, which is what `pip install` leaves behind.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from platforms import registry

FAKE_DIST = "engine-fakeplug"
FAKE_MODULE = "engine_fakeplug_tests"

_PLUGIN_SOURCE = '''
from platforms.cpu.platform import CpuPlatform
from platforms.hookspecs import hookimpl


class FakeAccelPlatform(CpuPlatform):
    """The CPU platform under another name and a higher priority."""

    name = "fakeaccel"
    priority = 5


@hookimpl
def engine_platforms():
    return [FakeAccelPlatform]
'''


@pytest.fixture(autouse=True)
def clean_platform_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(registry.PLATFORM_ENV, raising=False)
    monkeypatch.delenv(registry.PLUGINS_ENV, raising=False)
    registry.reset_registry()
    yield
    registry.reset_registry()


def write_fake_distribution(root: Path) -> Path:
    """Lay out module + dist-info under `root`; return `root` (to go on sys.path)."""
    (root / f"{FAKE_MODULE}.py").write_text(_PLUGIN_SOURCE)
    info = root / "engine_fakeplug-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        textwrap.dedent(f"""\
            Metadata-Version: 2.1
            Name: {FAKE_DIST}
            Version: 0.1
            """)
    )
    info.joinpath("entry_points.txt").write_text(
        f"[engine.plugins]\nfakeplug = {FAKE_MODULE}\n"
    )
    return root


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = write_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop(FAKE_MODULE, None)
