"""Sessions: tests, lint, typecheck, docs, demo, node (the interop fixture)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session
def node(session: nox.Session) -> None:
    """Install the pinned graphile-worker@0.18.0 used by the interop tests."""
    session.run("npm", "ci", "--prefix", "tests/node", "--no-audit", "--no-fund", external=True)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (DATABASE_URL, or an embedded PostgreSQL)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the benchmarks."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")
    session.chdir("benchmarks")
    session.run(
        "mypy", "--strict", "enqueue.py", "worker.py", "processes.py", "common.py", "dashboard.py"
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation strictly: a broken link or a missing reference fails."""
    session.install("-e", ".[docs]")
    site = session.posargs[0] if session.posargs else "site"
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: the demo (on DATABASE_URL, else an embedded PostgreSQL)."""
    session.install("-e", ".[demo]")
    session.run("graphile-worker", "demo")
