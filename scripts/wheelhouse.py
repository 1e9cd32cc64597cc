"""Build every distribution of this repo as a wheel, and (optionally) download the wheels of
the dependencies an accelerator image lacks, so `pip install --no-index --find-links OUT
"engine[cuda]"` works on a machine without internet.

Rule: the dependency list is computed from the wheels' own metadata (Requires-Dist), walked
through the metadata of the packages installed here, never typed by hand; only the packages
the accelerator image brings itself (torch, triton, numpy, transformers, and what they
need) are left out. Versions are pinned to the ones installed here, which the tests passed
with.

    python scripts/wheelhouse.py wheels OUT            # engine + every plugins/*/ distribution
    python scripts/wheelhouse.py deps                   # print the pinned dependency list
    python scripts/wheelhouse.py house OUT [--python-version 3.12] [--platform TAG]
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The accelerator image has these (and their own dependencies): never download them.
IMAGE_HAS = ("torch", "triton", "numpy", "transformers")
# Extras of the root distribution the wheelhouse serves, and tools the GPU check runs.
EXTRAS = ("cuda", "structured")
TOOLS = ("pytest", "pytest-timeout", "pip")
_SKIP_COPY = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info", "tests",
                                    ".pytest_cache")


def distributions() -> list[Path]:
    """Source folders of every distribution: the root first, then each plugin."""
    plugins = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
    return [ROOT, *plugins]


def _copy_source(src: Path, dst: Path) -> None:
    """A clean copy to build from, so stale `build/` folders never leak old files into a
    wheel and concurrent builds never share one."""
    if src == ROOT:
        dst.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(src / name, dst / name)
        for package in ("engine", "platforms"):
            shutil.copytree(src / package, dst / package, ignore=_SKIP_COPY)
    else:
        shutil.copytree(src, dst, ignore=_SKIP_COPY)


def build_wheels(out: Path, isolated: bool = False) -> list[Path]:
    """`pip wheel --no-deps` of each distribution into `out`; returns the wheel paths."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    with tempfile.TemporaryDirectory(prefix="engine-wheels-") as tmp:
        for i, src in enumerate(distributions()):
            copy = Path(tmp) / f"{i}-{src.name}"
            _copy_source(src, copy)
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                   str(copy)]
            if not isolated:
                cmd.insert(4, "--no-build-isolation")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # the build's own warnings are noise unless it failed
                sys.stderr.write(done.stdout + done.stderr)
                raise SystemExit(f"building the wheel of {src} failed: {' '.join(cmd)}")
    built = sorted(set(out.glob("*.whl")) - before) or sorted(out.glob("*.whl"))
    return built


def _wheel_requires(wheel: Path) -> tuple[str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(name).decode())
    return canonicalize_name(meta["Name"]), meta.get_all("Requires-Dist") or []


def _target_env(python_version: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python_version, python_full_version=python_version + ".0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def _applies(req: Requirement, env: dict[str, str], extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def dependency_pins(wheels: list[Path], python_version: str = "3.12") -> list[str]:
    """`name==version` of every dependency of `wheels` (with the EXTRAS) and TOOLS, walked
    through the installed metadata, minus IMAGE_HAS and their closures, minus the wheels."""
    env = _target_env(python_version)
    ours: set[str] = set()
    todo: list[Requirement] = []
    for wheel in wheels:
        name, requires = _wheel_requires(wheel)
        ours.add(name)
        todo += [r for r in map(Requirement, requires) if _applies(r, env, EXTRAS)]
    todo += [Requirement(t) for t in TOOLS]
    skip = {canonicalize_name(n) for n in IMAGE_HAS}
    pins: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip or name in ours or name in pins:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            pins[name] = str(req).split(";")[0]  # not installed here: let pip pick a version
            continue
        pins[name] = f"{name}=={dist.version}"
        extras = tuple(req.extras)
        todo += [r for r in map(Requirement, dist.requires or []) if _applies(r, env, extras)]
    return sorted(pins.values())


def download(pins: list[str], out: Path, python_version: str, platforms: list[str]) -> None:
    """Binary wheels for the target interpreter and platform; pure wheels match any."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "--python-version", python_version, "--implementation", "cp", "-d", str(out)]
    for tag in platforms:
        cmd += ["--platform", tag]
    subprocess.run(cmd + pins, check=True)


def _platform_tags(first: str) -> list[str]:
    """The given manylinux tag plus the older ones a wheel may carry (pip matches exactly)."""
    arch = first.rsplit("_", 2)[-2:] if first.startswith("manylinux_") else ["x86", "64"]
    arch_name = "_".join(arch)
    newest = int(first.split("_")[2]) if first.startswith("manylinux_2_") else 28
    tags = [first] + [f"manylinux_2_{n}_{arch_name}" for n in range(newest, 4, -1)]
    tags += [f"manylinux2014_{arch_name}", f"manylinux1_{arch_name}"]
    return list(dict.fromkeys(tags))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    wheels = sub.add_parser("wheels", help="Build every distribution into OUT.")
    wheels.add_argument("out", type=Path)
    wheels.add_argument("--isolated", action="store_true", help="Use pip's build isolation.")
    deps = sub.add_parser("deps", help="Print the pinned dependencies the wheelhouse holds.")
    deps.add_argument("--python-version", default="3.12")
    house = sub.add_parser("house", help="Wheels + downloaded dependencies into OUT.")
    house.add_argument("out", type=Path)
    house.add_argument("--python-version", default="3.12")
    house.add_argument("--platform", default="manylinux_2_28_x86_64")
    args = parser.parse_args(argv)

    if args.cmd == "wheels":
        for wheel in build_wheels(args.out, args.isolated):
            print(wheel)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        built = build_wheels(Path(tmp))
        pins = dependency_pins(built, args.python_version)
        if args.cmd == "deps":
            print("\n".join(pins))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        for wheel in built:
            shutil.copy2(wheel, args.out / wheel.name)
    download(pins, args.out, args.python_version, _platform_tags(args.platform))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wheelhouse {args.out}: {len(os.listdir(args.out))} wheels, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
