"""Which errors are transient, and which name a missing worker schema, on real errors.

The errors come from a real PostgreSQL (a missing schema, a terminated backend, a
deadlock, a serialisation failure, a refused connection), caught as SQLAlchemy wraps them
and as the driver raises them. :func:`is_transient` is the one classifier the worker uses
wherever it decides to retry; :func:`translate_db_error` decides ``SchemaNotMigrated`` by
SQLSTATE and by the worker schema qualifying the missing object, never by loose text.
"""

from __future__ import annotations

import errno
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import NullPool

from sqla_graphile._urls import engine_from_url
from sqla_graphile.errors import (
    SchemaNotMigrated,
    is_transient,
    sqlstate_of,
    translate_db_error,
)
from sqla_graphile.schema import quote_schema
from sqla_graphile.worker import connection as worker_connection
from sqla_graphile.worker import fetcher as worker_fetcher
from sqla_graphile.worker import recovery as worker_recovery
from sqla_graphile.worker.connection import StatementTimeout


def failure(engine: Engine, sql: str) -> DBAPIError:
    """The error ``sql`` raises, as SQLAlchemy wraps it."""
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        connection.execute(text(sql))
    return info.value


@pytest.fixture
def empty_schema(engine: Engine, schema_name: str) -> str:
    """A worker schema name whose schema exists but holds nothing."""
    with engine.begin() as connection:
        connection.execute(text(f"create schema {quote_schema(schema_name)}"))
    return schema_name


# -- SchemaNotMigrated: by SQLSTATE, for objects of the worker schema ---------------------------


def test_a_missing_worker_schema_is_schema_not_migrated(engine: Engine, schema_name: str) -> None:
    error = failure(engine, f"select {quote_schema(schema_name)}.add_job('t')")
    assert sqlstate_of(error) == "3F000"  # invalid_schema_name
    assert isinstance(translate_db_error(error, schema=schema_name), SchemaNotMigrated)
    assert not is_transient(error)


@pytest.mark.parametrize(
    ("sql", "state"),
    [
        ("select * from {s}._private_jobs", "42P01"),  # undefined_table
        ("select {s}.add_job('t')", "42883"),  # undefined_function
        ("select cast(null as {s}.job_spec)", "42704"),  # undefined_object (a type)
    ],
    ids=["table", "function", "type"],
)
def test_a_missing_object_of_the_worker_schema_is_schema_not_migrated(
    engine: Engine, empty_schema: str, sql: str, state: str
) -> None:
    error = failure(engine, sql.format(s=quote_schema(empty_schema)))
    assert sqlstate_of(error) == state
    assert isinstance(translate_db_error(error, schema=empty_schema), SchemaNotMigrated)
    assert not is_transient(error)


def test_a_schema_name_is_matched_whole(engine: Engine, empty_schema: str) -> None:
    """Another schema whose name merely starts with the worker schema's is not it."""
    error = failure(engine, f"select {quote_schema(empty_schema + 'x')}.add_job('t')")
    assert sqlstate_of(error) == "3F000"
    assert translate_db_error(error, schema=empty_schema) is None


@pytest.mark.parametrize(
    "sql",
    [
        "select * from other_{n}._private_jobs",  # another schema's "_private_" table
        "select * from {s}_jobs",  # a table named after the worker schema, elsewhere
        "select 1 + now()",  # 42883 for an operator, not a worker function
        "do $$ begin raise exception '{s}._private_jobs does not exist'; end $$",
    ],
    ids=["other-private", "name-prefix", "operator", "raised-text"],
)
def test_errors_that_merely_mention_the_schema_are_not_schema_not_migrated(
    engine: Engine, empty_schema: str, sql: str
) -> None:
    error = failure(engine, sql.format(s=empty_schema, n=secrets.token_hex(3)))
    assert translate_db_error(error, schema=empty_schema) is None
    assert not is_transient(error)


def test_ordinary_statement_errors_are_permanent(engine: Engine) -> None:
    assert not is_transient(failure(engine, "select 1 / 0"))  # 22012
    assert not is_transient(failure(engine, "select 'x'::int"))  # 22P02


# -- transient: a lost link ------------------------------------------------------------------


@pytest.fixture
def unpooled(database_url: str) -> Iterator[Engine]:
    engine = engine_from_url(database_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def test_a_terminated_backend_is_transient(engine: Engine, unpooled: Engine) -> None:
    with unpooled.connect() as victim:
        pid = victim.scalar(text("select pg_backend_pid()"))
        with engine.connect() as killer:
            assert killer.scalar(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as info:
            victim.execute(text("select 1"))
    error = info.value
    assert is_transient(error)
    assert is_transient(error.orig)  # the driver's own error too
    assert translate_db_error(error, schema="graphile_worker") is None


def test_a_refused_connection_is_transient() -> None:
    # Port 1 on the loopback: nothing listens, the connection is refused at once.
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect("postgresql://nobody@127.0.0.1:1/none", connect_timeout=5)
    assert sqlstate_of(info.value) is None
    assert is_transient(info.value)


# -- transient: concurrency the server resolved by refusing one side ---------------------------


@pytest.fixture
def table(engine: Engine) -> Iterator[str]:
    name = f"classify_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(text(f"create table {name} (id int primary key, v int)"))
        connection.execute(text(f"insert into {name} values (1, 0), (2, 0)"))
    yield name
    with engine.begin() as connection:
        connection.execute(text(f"drop table {name}"))


def test_a_deadlock_is_transient(database_url: str, table: str) -> None:
    one = psycopg.connect(database_url)
    two = psycopg.connect(database_url)
    try:
        for connection in (one, two):
            connection.execute("set deadlock_timeout = '50ms'")
        one.execute(f"update {table} set v = 1 where id = 1")
        two.execute(f"update {table} set v = 2 where id = 2")
        errors: list[BaseException] = []

        def cross() -> None:
            try:
                one.execute(f"update {table} set v = 1 where id = 2")
            except psycopg.Error as exc:
                errors.append(exc)

        waiter = threading.Thread(target=cross)
        waiter.start()
        try:
            two.execute(f"update {table} set v = 2 where id = 1")
        except psycopg.Error as exc:
            errors.append(exc)
        finally:
            two.rollback()  # let the other side through if it was the one waiting
        waiter.join(30)
        assert not waiter.is_alive()
        assert [sqlstate_of(exc) for exc in errors] == ["40P01"]
        assert is_transient(errors[0])
    finally:
        one.close()
        two.close()


def test_a_serialisation_failure_is_transient(database_url: str, table: str) -> None:
    one = psycopg.connect(database_url)
    two = psycopg.connect(database_url)
    try:
        for connection in (one, two):
            connection.execute("set transaction isolation level serializable")
            connection.execute(f"select sum(v) from {table}")
        one.execute(f"insert into {table} values (3, 0)")
        one.commit()
        # Each read what the other writes: the second to write (or commit) is refused.
        with pytest.raises(psycopg.Error) as info:
            two.execute(f"insert into {table} values (4, 0)")
            two.commit()
        assert sqlstate_of(info.value) == "40001"
        assert is_transient(info.value)
    finally:
        one.close()
        two.close()


# -- Python's own errors: connection-level yes, programming errors never ----------------------


def test_operating_system_errors_other_than_the_network_are_permanent(tmp_path: Path) -> None:
    with pytest.raises(OSError) as missing:
        (tmp_path / "missing").read_text()
    assert not is_transient(missing.value)
    assert not is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(socket.gaierror(socket.EAI_NONAME, "no such host"))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        OSError(errno.ENETUNREACH, "network unreachable"),
        OSError(errno.EHOSTUNREACH, "no route to host"),
        TimeoutError("timed out"),
        StatementTimeout("no answer within 30 s"),
        socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution"),
        PoolTimeoutError("QueuePool limit reached"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_level_errors_are_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [TypeError("bad argument"), ValueError("bad value"), KeyError("script"), RuntimeError("x")],
    ids=lambda e: type(e).__name__,
)
def test_programming_errors_are_never_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_every_retry_decision_uses_the_one_classifier() -> None:
    modules: list[Any] = [worker_connection, worker_fetcher, worker_recovery]
    for module in modules:
        assert module.is_transient is is_transient, module.__name__
