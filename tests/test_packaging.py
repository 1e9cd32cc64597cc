"""Packaging: the repo's distributions build as wheels and install offline as `engine[cuda]`.

Rule: the test installs the way a user without internet does: wheels built from the checkout,
`pip install --no-index --find-links <folder> "engine[cuda]"` into a fresh environment that
has the third-party packages (torch...) but none of ours, then asks that environment, from
outside the checkout, which plugins it sees.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
# Entries of our own distributions in a site-packages folder (editable installs included).
_OURS = re.compile(r"^(__editable__[._]+)?(engine|engine_cuda|engine-cuda|platforms)([-_.]|$)")


def _wheelhouse_module():
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts/wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toml(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_plugin_metadata_matches_the_engine():
    root = _toml(ROOT / "pyproject.toml")["project"]
    cuda = _toml(ROOT / "plugins/cuda/pyproject.toml")["project"]
    assert cuda["name"] == "engine-cuda"
    assert cuda["version"] == root["version"]
    assert f"engine=={root['version']}" in cuda["dependencies"]
    assert any(d.startswith("triton>=3.2") and "Linux" in d for d in cuda["dependencies"])
    assert cuda["entry-points"]["engine.plugins"] == {"cuda": "engine_cuda"}
    assert root["optional-dependencies"]["cuda"] == ["engine-cuda"]


def test_wheelhouse_dependencies_are_computed_and_leave_out_what_the_image_has(tmp_path):
    wheelhouse = _wheelhouse_module()
    wheels = wheelhouse.build_wheels(tmp_path)
    pins = wheelhouse.dependency_pins(wheels, "3.12")
    names = {p.split("==")[0] for p in pins}
    for needed in ("pydantic", "pydantic-core", "annotated-types", "fastapi", "starlette",
                   "uvicorn", "h11", "pyzmq", "msgspec", "gguf", "prometheus-client",
                   "pluggy", "pytest", "pip"):
        assert needed in names, needed
    for image_has in ("torch", "triton", "numpy", "transformers", "engine", "engine-cuda"):
        assert image_has not in names, image_has
    assert all("==" in p for p in pins if p.split("==")[0] in ("pydantic", "pyzmq"))


def _shadow_site(tmp_path: Path) -> Path:
    """This interpreter's site-packages without our distributions, as links: the stand-in
    for an accelerator image that has torch and friends but not the engine."""
    shadow = tmp_path / "image-site"
    shadow.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if _OURS.match(entry.name) or entry.suffix == ".pth":
            continue
        (shadow / entry.name).symlink_to(entry)
    return shadow


VENDORS = ("cuda", "rocm", "tpu", "ascend", "spyre", "gaudi")


def test_every_plugin_installs_offline_from_wheels_and_registers(tmp_path):
    """`engine[cuda]` and every other vendor extra install into a fresh environment from the
    wheels alone; each plugin comes from its own distribution, shows in `engine plugins`,
    and none is selected on this machine, which has none of their hardware."""
    wheels = tmp_path / "wheels"
    _wheelhouse_module().build_wheels(wheels)
    built = {p.name.split("-")[0] for p in wheels.glob("*.whl")}
    plugins = {p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml")}
    assert built == {"engine"} | {f"engine_{name}" for name in plugins}, built
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "image.pth").write_text(str(_shadow_site(tmp_path)) + "\n")

    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean_env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--find-links", str(wheels), f"engine[{','.join(VENDORS)}]"],
        check=True, env=clean_env, cwd=tmp_path)

    probe = ("import importlib.metadata as md, json, engine, engine_cuda; print(json.dumps("
             "{'eps': [[e.name, e.dist.name] for e in md.entry_points(group='engine.plugins')],"
             " 'engine': engine.__file__, 'engine_cuda': engine_cuda.__file__}))")
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=clean_env).stdout
    found = json.loads(out)
    eps = [[n, d.replace("_", "-")] for n, d in found["eps"]]
    for vendor in VENDORS:
        assert [vendor, f"engine-{vendor}"] in eps, eps
    assert found["engine"].startswith(str(env_dir)), found  # the wheel, not the checkout
    assert found["engine_cuda"].startswith(str(env_dir)), found

    plugins = subprocess.run([env_dir / "bin" / "engine", "plugins"], capture_output=True,
                             text=True, cwd=tmp_path, env=clean_env, timeout=300)
    assert plugins.returncode == 0, plugins.stdout + plugins.stderr
    rows = {line.split()[0]: line.split() for line in plugins.stdout.splitlines() if line}
    for vendor in VENDORS:
        assert vendor in rows, plugins.stdout
        name, distribution, available = rows[vendor][:3]
        assert distribution.replace("_", "-") == f"engine-{vendor}", plugins.stdout
        assert available == "no", plugins.stdout  # none of their hardware here
    assert "selected: cpu" in plugins.stdout
