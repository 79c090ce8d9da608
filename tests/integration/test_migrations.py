"""The worker-schema migrations: Graphile's ledger, notifications, concurrency, adoption.

Everything runs against a real PostgreSQL. Databases "migrated by Node" are built by
applying Node graphile-worker 0.18's own migration files from the npm fixture, the way
Node applies them, at test time.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from migration_fixtures import (
    BREAKING,
    EXPECTED_LEDGER,
    Listener,
    apply_node_migrations,
    catalog_snapshot,
    function_defs,
    ledger,
    migrate_payload,
    node_quote,
    our_heads,
)
from sqlalchemy import Engine, text

from sqla_graphile import AsyncWorkerUtils, DatabaseNewerThanLibrary, migrate
from sqla_graphile._urls import async_engine_from_url
from sqla_graphile.errors import LedgerTooOld, UsageError
from sqla_graphile.migrations import NewerDatabaseWarning, migration_lock


def assert_functions_work(engine: Engine, schema: str) -> None:
    q = node_quote(schema)
    with engine.begin() as conn:
        job = conn.execute(
            text(f"select * from {q}.add_job('smoke', '{{\"a\": 1}}', job_key => 'k')")
        ).one()
        view = conn.execute(
            text(f"select task_identifier, key, revision from {q}.jobs where id = :i"),
            {"i": job.id},
        ).one()
        assert tuple(view) == ("smoke", "k", 0)
        done = conn.execute(
            text(f"select id from {q}.complete_jobs(array[:i]::bigint[])"), {"i": job.id}
        )
        assert [row.id for row in done] == [job.id]
        assert (
            conn.scalar(
                text(f"select count(*) from {q}._private_jobs where id = :i"), {"i": job.id}
            )
            == 0
        )


# --- 1. a fresh migration ---------------------------------------------------------------


def test_fresh_migrate_records_the_ledger_and_announces_each_migration(
    engine: Engine, schema_name: str, listener: Listener
) -> None:
    migrate(engine, schema=schema_name)

    assert ledger(engine, schema_name) == EXPECTED_LEDGER
    assert {n for n, breaking in ledger(engine, schema_name) if breaking} == BREAKING
    assert listener.received() == [migrate_payload(n) for n in range(1, 21)]
    assert migrate_payload(19) == '{"migrationNumber":19,"breaking":true}'
    assert migrate_payload(20) == '{"migrationNumber":20,"breaking":false}'
    assert_functions_work(engine, schema_name)


def test_migrate_twice_is_a_noop(engine: Engine, schema_name: str, listener: Listener) -> None:
    migrate(engine, schema=schema_name)
    assert len(listener.received()) == 20
    before = catalog_snapshot(engine, schema_name)

    migrate(engine, schema=schema_name)

    assert listener.received() == []
    after = catalog_snapshot(engine, schema_name)
    assert after["ledger"] == before["ledger"]
    assert after == before


def test_migrate_from_a_url(database_url: str, engine: Engine, schema_name: str) -> None:
    migrate(database_url, schema=schema_name)
    assert ledger(engine, schema_name) == EXPECTED_LEDGER


# --- 2. concurrent migrators -------------------------------------------------------------

_CHILD = """
import sys
import psycopg
from sqla_graphile import migrate

url, schema, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
with psycopg.connect(url, autocommit=True) as gate:
    # Blocks until the parent opens the gate, so that all children start together.
    gate.execute("select pg_advisory_lock_shared(4242, %s)", (key,))
    gate.execute("select pg_advisory_unlock_shared(4242, %s)", (key,))
migrate(url, schema=schema)
"""


def assert_migrated_once(engine: Engine, schema: str, listener: Listener) -> None:
    """One correct schema, its work done once: each migration announced exactly once."""
    assert ledger(engine, schema) == EXPECTED_LEDGER
    assert listener.received() == [migrate_payload(n) for n in range(1, 21)]
    with engine.connect() as conn:
        assert conn.scalar(text(f"select count(*) from {node_quote(schema)}.alembic_version")) == 1
    assert_functions_work(engine, schema)


def migrate_in_processes(database_url: str, schema: str, count: int) -> None:
    """``count`` processes call ``migrate()`` at the same moment; each must succeed."""
    key = secrets.randbelow(2**31 - 1)
    with psycopg.connect(database_url, autocommit=True) as gate:
        gate.execute("select pg_advisory_lock(4242, %s)", (key,))
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, database_url, schema, str(key)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        try:
            deadline = time.monotonic() + 60
            waiting = 0
            while waiting < count:
                waiting = gate.execute(
                    "select count(*) from pg_locks where locktype = 'advisory'"
                    " and classid = 4242 and objid = %s and not granted",
                    (key,),
                ).fetchone()[0]  # type: ignore[index]
                if any(child.poll() is not None for child in children):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert waiting == count, "the migrators never all reached the starting gate"
        finally:
            gate.execute("select pg_advisory_unlock(4242, %s)", (key,))
            outputs = [child.communicate(timeout=120) for child in children]

    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err


def test_four_processes_migrating_at_once_leave_one_correct_schema(
    database_url: str, engine: Engine, schema_name: str, listener: Listener
) -> None:
    migrate_in_processes(database_url, schema_name, 4)
    assert_migrated_once(engine, schema_name, listener)


@pytest.mark.parametrize("round_", range(3))
def test_three_processes_on_a_fresh_schema_leave_one_correct_schema(
    database_url: str, engine: Engine, schema_name: str, listener: Listener, round_: int
) -> None:
    migrate_in_processes(database_url, schema_name, 3)
    assert_migrated_once(engine, schema_name, listener)


@pytest.mark.parametrize("round_", range(3))
def test_four_threads_migrating_at_once_leave_one_correct_schema(
    database_url: str, engine: Engine, schema_name: str, listener: Listener, round_: int
) -> None:
    """Alembic's context is process-wide: threads of one process must take turns."""
    start = threading.Barrier(4)
    errors: list[BaseException] = []
    binds: list[Any] = [engine, engine, database_url, engine]

    def run(bind: Any) -> None:
        try:
            start.wait(30)
            migrate(bind, schema=schema_name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(bind,), daemon=True) for bind in binds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a migrate() call hung"
    assert errors == []
    assert_migrated_once(engine, schema_name, listener)


async def test_async_migrations_of_one_loop_and_a_thread_take_turns(
    database_url: str, engine: Engine, schema_name: str, listener: Listener
) -> None:
    """Tasks of one event loop migrating at once neither clash nor block the loop."""
    engines = [async_engine_from_url(database_url) for _ in range(3)]
    try:
        in_thread = asyncio.to_thread(migrate, engine, schema_name)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    in_thread, *(AsyncWorkerUtils(e, schema_name).migrate() for e in engines)
                ),
                120,
            )
        finally:
            ticker.cancel()
        assert ticks > 1  # the loop kept running while the migrations took turns
    finally:
        for async_engine in engines:
            await async_engine.dispose()
    assert_migrated_once(engine, schema_name, listener)


def test_migrate_inside_a_migration_of_the_same_thread_is_refused(
    engine: Engine, schema_name: str
) -> None:
    with migration_lock.held(), pytest.raises(UsageError, match="same thread"):
        migrate(engine, schema=schema_name)
    migrate(engine, schema=schema_name)  # the lock was released
    assert ledger(engine, schema_name) == EXPECTED_LEDGER


# --- 3. ledgers this library must not (silently) use --------------------------------------


@pytest.fixture(
    params=[
        "node",
        "ours",
    ]
)
def schema_at_20(request: pytest.FixtureRequest, engine: Engine, schema_name: str) -> str:
    """A schema at ledger 20, migrated by Node's files or by this library."""
    if request.param == "node":
        node_dir = request.getfixturevalue("node_dir")
        database_url = request.getfixturevalue("database_url")
        apply_node_migrations(
            database_url, schema_name, node_dir / "node_modules/graphile-worker/sql", 20
        )
    else:
        migrate(engine, schema=schema_name)
    return schema_name


@pytest.mark.node
def test_breaking_migration_newer_than_the_library_is_refused(
    engine: Engine, schema_at_20: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(f"insert into {node_quote(schema_at_20)}.migrations values (21, now(), true)")
        )
    before = catalog_snapshot(engine, schema_at_20)

    with pytest.raises(DatabaseNewerThanLibrary) as info:
        migrate(engine, schema=schema_at_20)

    assert info.value.breaking_id == 21
    assert "unsafe" in str(info.value) and "upgrade sqla-graphile" in str(info.value)
    assert catalog_snapshot(engine, schema_at_20) == before


@pytest.mark.node
def test_non_breaking_newer_migration_warns_and_continues(
    engine: Engine, schema_at_20: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(f"insert into {node_quote(schema_at_20)}.migrations values (21, now(), false)")
        )
    before = ledger(engine, schema_at_20)

    with pytest.warns(NewerDatabaseWarning, match="21"):
        migrate(engine, schema=schema_at_20)

    assert ledger(engine, schema_at_20) == before == [*EXPECTED_LEDGER, (21, False)]
    with engine.connect() as conn:
        stamped = conn.scalars(
            text(f"select version_num from {node_quote(schema_at_20)}.alembic_version")
        ).all()
    assert stamped == our_heads()


@pytest.mark.node
def test_ledger_older_than_18_is_refused_with_instructions(
    database_url: str, engine: Engine, schema_name: str, node_sql: Path
) -> None:
    apply_node_migrations(database_url, schema_name, node_sql, 17)
    before = catalog_snapshot(engine, schema_name)

    with pytest.raises(LedgerTooOld) as info:
        migrate(engine, schema=schema_name)

    message = str(info.value)
    assert "17" in message
    assert "graphile-worker" in message and "--schema-only" in message
    assert "migrate again" in message
    assert catalog_snapshot(engine, schema_name) == before
    with engine.connect() as conn:
        assert (
            conn.scalar(
                text("select to_regclass(:t)"), {"t": f"{node_quote(schema_name)}.alembic_version"}
            )
            is None
        )


# --- 4. adopting a schema Node migrated ---------------------------------------------------


@pytest.mark.node
def test_schema_node_migrated_to_20_is_adopted_without_any_ddl(
    database_url: str, engine: Engine, schema_name: str, node_sql: Path, listener: Listener
) -> None:
    apply_node_migrations(database_url, schema_name, node_sql, 20)
    assert listener.received() == [migrate_payload(n) for n in range(1, 21)]
    before = catalog_snapshot(engine, schema_name)

    migrate(engine, schema=schema_name)

    assert catalog_snapshot(engine, schema_name) == before
    assert ledger(engine, schema_name) == EXPECTED_LEDGER
    assert listener.received() == []
    # Adopted: the next run is a no-op too, and Node's functions serve us.
    migrate(engine, schema=schema_name)
    assert catalog_snapshot(engine, schema_name) == before
    assert_functions_work(engine, schema_name)


@pytest.mark.node
@pytest.mark.parametrize("node_ledger", [18, 19])
def test_schema_node_migrated_to_18_or_19_is_brought_to_20(
    database_url: str,
    engine: Engine,
    schema_name: str,
    node_sql: Path,
    listener: Listener,
    node_ledger: int,
) -> None:
    apply_node_migrations(database_url, schema_name, node_sql, node_ledger)
    assert len(listener.received()) == node_ledger
    before_functions = function_defs(engine, schema_name)
    before = catalog_snapshot(engine, schema_name)

    migrate(engine, schema=schema_name)

    assert ledger(engine, schema_name) == EXPECTED_LEDGER
    after = catalog_snapshot(engine, schema_name)
    assert after["ledger"][:node_ledger] == before["ledger"]
    assert listener.received() == [migrate_payload(n) for n in range(node_ledger + 1, 21)]

    # add_job and add_jobs were replaced by migration 20's versions; nothing else moved.
    after_functions = function_defs(engine, schema_name)
    assert set(after_functions) == set(before_functions)
    for name in ("add_job", "add_jobs"):
        assert after_functions[name] != before_functions[name]
    for name in set(before_functions) - {"add_job", "add_jobs"}:
        assert after_functions[name] == before_functions[name]
    for part in ("classes", "attributes", "constraints", "indexes", "types", "sequences"):
        assert after[part] == before[part]

    # Migration 20's behaviour: re-adding known task identifiers and queue names no
    # longer consumes identity values.
    q = node_quote(schema_name)
    with engine.begin() as conn:
        for _ in range(3):
            conn.execute(text(f"select {q}.add_job('t', queue_name => 'q')"))
            conn.execute(
                text(
                    f"select * from {q}.add_jobs(array[row('t', null, 'q', null, null,"
                    f" null, null, null)::{q}.job_spec])"
                )
            )
        assert conn.scalar(text(f"select last_value from {q}.tasks_id_seq")) == 1
        assert conn.scalar(text(f"select last_value from {q}.job_queues_id_seq")) == 1
        assert conn.scalar(text(f"select count(*) from {q}.jobs")) == 6
    assert_functions_work(engine, schema_name)
