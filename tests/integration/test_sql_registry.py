"""The SQL registry: every statement of the library, defined once, in ``sqla_graphile.sql``.

The registry lists its statements by name for a schema; each compiles for PostgreSQL, no
two share their SQL, and no SQL text is written anywhere else in the package (migration
revisions aside: they are frozen history). Task registration, wherever it happens, never
consumes identity values; the 4-hour rule is one constant; the worker's operations run
the same on every driver.
"""

from __future__ import annotations

import ast
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

import sqla_graphile
from sqla_graphile import CleanupTask, RawJobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile._drive import drive, drive_async
from sqla_graphile.recovery import NODE_LOCK_EXPIRY as RECOVERY_LOCK_EXPIRY
from sqla_graphile.recovery import registry_table
from sqla_graphile.schema import quote_schema, worker_schema
from sqla_graphile.sql import (
    IDEMPOTENT_OPTION,
    NODE_LOCK_EXPIRY,
    NOT_IDEMPOTENT,
    all_statements,
    is_idempotent,
    statements,
)
from sqla_graphile.worker.connection import Database
from sqla_graphile.worker.ops import register_tasks_op, sweep_locks_op, task_ids_op

PACKAGE = Path(sqla_graphile.__file__).parent
# Where SQL may be written as text: the registry itself, the migrations (the revisions
# under versions/ are frozen history), and schema.py, whose table declarations take
# their server defaults as SQL text and which defines literal_sql().
ALLOWED = ("sql/", "migrations/", "schema.py")
DIALECTS = {
    "psycopg2": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "psycopg": psycopg_dialect.dialect(),  # type: ignore[no-untyped-call]
}
ODD_SCHEMA = 'Odd "schema" %s:x'


def compiled(statement: Any, dialect: str = "psycopg2") -> str:
    return str(statement.compile(dialect=DIALECTS[dialect]))


# -- the registry lists every statement --------------------------------------------------------


def test_the_registry_lists_every_concern() -> None:
    names = all_statements("graphile_worker")
    concerns = {name.split(".")[0] for name in names}
    assert concerns == {"adding", "admin", "recovery", "worker", "catalog", "cron", "dashboard"}
    # A few by name, among them statements that used to live in several places.
    for name in (
        "adding.register_tasks",
        "adding.task_ids",
        "admin.get_job",
        "admin.list_jobs[ready,task,queue]",
        "recovery.heartbeat",
        "worker.fetch",
        "worker.sweep",
        "cron.schedule",
        "catalog.schema_exists",
    ):
        assert name in names
    # One object per statement, built once per schema.
    assert statements("graphile_worker") is statements("graphile_worker")
    assert all_statements("graphile_worker")["worker.fetch"] is names["worker.fetch"]


@pytest.mark.parametrize("schema", ["graphile_worker", ODD_SCHEMA])
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_statement_compiles_for_postgresql(schema: str, dialect: str) -> None:
    for name, statement in all_statements(schema).items():
        sql = compiled(statement, dialect)
        assert sql.strip(), name
    # The schema is quoted by SQLAlchemy wherever it appears.
    fetch = compiled(all_statements(schema)["worker.fetch"], dialect)
    if schema == ODD_SCHEMA:
        assert '"Odd ""schema"" %' in fetch


@pytest.mark.parametrize("schema", ["graphile_worker", ODD_SCHEMA])
def test_no_two_statements_share_their_sql(schema: str) -> None:
    seen: dict[str, str] = {}
    for name, statement in all_statements(schema).items():
        sql = " ".join(compiled(statement).split())
        assert sql not in seen, f"{name} repeats {seen[sql]}"
        seen[sql] = name


def _text_calls(path: Path) -> list[str]:
    """Calls of ``text(...)`` / ``literal_sql(...)`` (by name or attribute) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in ("text", "literal_sql"):
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno}")
    return found


def test_no_sql_text_outside_the_registry_and_the_migrations() -> None:
    allowed, elsewhere = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        calls = _text_calls(path)
        (allowed if relative.startswith(ALLOWED) else elsewhere).extend(calls)
    assert elsewhere == []
    # The scan does find such calls where they are allowed (it is not blind).
    assert any(call.startswith("sql/") for call in allowed)
    assert any(call.startswith("migrations/versions/") for call in allowed)


# -- what used to disagree -------------------------------------------------------------------


def test_the_4_hour_rule_is_one_constant() -> None:
    assert timedelta(hours=4) == NODE_LOCK_EXPIRY
    assert RECOVERY_LOCK_EXPIRY is NODE_LOCK_EXPIRY
    registry = statements("graphile_worker")
    for statement in (registry.worker.sweep, registry.recovery.recover_expired_jobs):
        params = statement.compile(dialect=DIALECTS["psycopg"]).params
        assert NODE_LOCK_EXPIRY in params.values()
    # Spelled nowhere as SQL text.
    for name, statement in all_statements("graphile_worker").items():
        assert "hours" not in compiled(statement), name


def test_the_registry_table_is_declared_with_the_schema() -> None:
    name = f"gw_{secrets.token_hex(4)}"
    ws = worker_schema(name)
    # In the schema's metadata from the start, not added by whoever asks for it first.
    assert set(ws.metadata.tables) == {
        f"{name}.{table}"
        for table in (
            "_private_jobs",
            "_private_job_queues",
            "_private_tasks",
            "_private_known_crontabs",
            "migrations",
            "_sqla_graphile_workers",
        )
    }
    assert registry_table(name) is ws.worker_registry
    assert ws.metadata.tables[f"{name}._sqla_graphile_workers"] is ws.worker_registry


@task("reg_a")
def reg_a(payload: Any, ctx: WorkerContext) -> None:
    pass


@task("reg_b")
def reg_b(payload: Any, ctx: WorkerContext) -> None:
    pass


def _task_ids(engine: Engine, schema: str) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"select identifier, id from {quote_schema(schema)}._private_tasks")
        ).all()
    return {identifier: task_id for identifier, task_id in rows}


def test_task_registration_never_consumes_identity_values(engine: Engine, schema: str) -> None:
    """Every place that registers tasks inserts only the missing ones, as add_jobs does."""
    utils = WorkerUtils(engine, schema, known_identifiers=["reg_a", "reg_b"])
    utils.add_raw_job("reg_a", {})
    with engine.begin() as connection:
        drive(connection, register_tasks_op(schema, ["reg_a", "reg_b"]))
    first = _task_ids(engine, schema)
    assert set(first) == {"reg_a", "reg_b"}
    for _ in range(3):
        # The worker at start, the cleanup keeping known tasks, the SQL functions.
        Worker(engine, [reg_a, reg_b], schema=schema).run_once()
        utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
        WorkerUtils(engine, schema).add_raw_jobs([RawJobSpec("reg_a", {}), RawJobSpec("reg_b", {})])
        Worker(engine, [reg_a, reg_b], schema=schema).run_once()
    assert _task_ids(engine, schema) == first
    # The next task takes the very next identity value: none was consumed meanwhile.
    WorkerUtils(engine, schema).add_raw_job("reg_c", {})
    assert _task_ids(engine, schema)["reg_c"] == max(first.values()) + 1


# -- one operation, every driver --------------------------------------------------------------


async def test_the_worker_operations_run_on_every_driver(
    engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    names = ["drv_a", "drv_b"]
    with engine.begin() as connection:
        drive(connection, register_tasks_op(schema, names))
        by_sync = drive(connection, task_ids_op(schema, names))
        swept_sync = drive(connection, sweep_locks_op(schema))
    async with async_engine.begin() as connection:
        by_async = await drive_async(connection, task_ids_op(schema, names))
    # The worker's held connections: statements compiled once, run on psycopg directly.
    db = Database(async_engine, schema, statement_timeout=10.0)
    (held,) = db.held(1)
    try:
        await db.drive(register_tasks_op(schema, names), what="registering", held=held)
        by_worker = await db.drive(task_ids_op(schema, names), what="task ids", held=held)
        swept_worker = await db.drive(sweep_locks_op(schema), what="sweep", held=held)
    finally:
        await held.release()
    assert sorted(by_sync.values()) == names
    assert by_sync == by_async == by_worker
    assert swept_sync == swept_worker == (0, 0)


def test_every_statement_is_tagged_idempotent_or_not() -> None:
    tags = {name: is_idempotent(statement) for name, statement in all_statements("gw_tags").items()}
    assert None not in tags.values(), [name for name, tag in tags.items() if tag is None]
    assert {name for name, tag in tags.items() if not tag} == NOT_IDEMPOTENT


@pytest.mark.parametrize("idempotent", [True, False])
async def test_the_worker_retries_a_statement_only_when_a_second_run_is_harmless(
    async_engine: AsyncEngine, schema: str, idempotent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A statement whose every run ends its own session: a transient failure, each time.
    dies = text("select pg_terminate_backend(pg_backend_pid())").execution_options(
        **{IDEMPOTENT_OPTION: idempotent}
    )
    db = Database(async_engine, schema, statement_timeout=10.0)
    with pytest.raises(OperationalError) as raised:
        await db.drive(_one(dies), what="the dying statement", retries=3)
    assert "terminat" in str(raised.value).lower()
    retried = [r for r in caplog.records if "the dying statement failed" in r.getMessage()]
    # Idempotent: tried 3 times (2 retries logged); not: tried once, never retried.
    assert len(retried) == (2 if idempotent else 0)
    # A guard that finds out what the first try did allows the retry again.
    if not idempotent:
        guarded: list[BaseException] = []
        with pytest.raises(OperationalError):
            await db.drive(
                _one(dies), what="the guarded statement", retries=2, on_retry=guarded.append
            )
        assert len(guarded) == 1


def _one(statement: Any) -> Any:
    """An operation of one statement (see ``sqla_graphile._drive``)."""
    yield statement, {}
    return None
