"""``worker:migrate`` notifications: only a breaking migration in the worker's own ledger
stops it, and then with ``DatabaseNewerThanLibrary`` (exit status 57 from the CLI)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import TIMEOUT, await_for, execute, running

import sqla_graphile
from sqla_graphile import Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.errors import DatabaseNewerThanLibrary
from sqla_graphile.schema import quote_schema

#: Node's announcement of a breaking migration newer than any this library knows (20).
BREAKING = '{"migrationNumber":21,"breaking":true}'
#: The checkout this test imports the library from (the CLI subprocess must use it too).
ROOT = Path(sqla_graphile.__file__).resolve().parent.parent


def notify_breaking(engine: Engine) -> None:
    execute(engine, "select pg_notify('worker:migrate', :payload)", payload=BREAKING)


def add_breaking_ledger_row(engine: Engine, schema: str) -> None:
    execute(
        engine, f"insert into {quote_schema(schema)}.migrations (id, breaking) values (21, true)"
    )


def remove_ledger_row(engine: Engine, schema: str) -> None:
    execute(engine, f"delete from {quote_schema(schema)}.migrations where id = 21")


def job_exists(engine: Engine, schema: str, job_id: int) -> bool:
    return bool(
        execute(
            engine,
            f"select 1 from {quote_schema(schema)}._private_jobs where id = :id",
            id=job_id,
        )
    )


async def test_breaking_notification_without_a_new_ledger_row_is_ignored(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    """A ``worker:migrate`` notification saying "breaking" while the worker's own schema
    ledger holds nothing new (another schema's migration, say) does not stop it: jobs
    added afterwards still run."""
    ran: list[int] = []

    @task("noop")
    async def noop(payload: Any, ctx: WorkerContext) -> None:
        ran.append(ctx.job.id)

    worker = Worker(async_engine, [noop], schema=schema, poll_interval=0.1)
    async with running(worker) as run:
        await await_for(lambda: worker.listening, what="the LISTEN connection")
        notify_breaking(engine)
        for n in range(2):
            job = utils.add_raw_job("noop", {"n": n})
            await await_for(
                lambda j=job: j.id in ran or run.done(), what="a job added after the notification"
            )
            assert not run.done(), "the worker stopped on another schema's migration"
        # The handler ran; its completion is written just after.
        await await_for(lambda: not job_exists(engine, schema, job.id), what="the completion")


async def test_breaking_migration_in_own_ledger_raises_database_newer_than_library(
    engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    """With a breaking migration newer than the library in the worker's own ledger, the
    notification stops the worker and ``run_async()`` raises ``DatabaseNewerThanLibrary``."""

    @task("noop")
    async def noop(payload: Any, ctx: WorkerContext) -> None:
        return None

    worker = Worker(async_engine, [noop], schema=schema, poll_interval=0.1)
    run = asyncio.create_task(worker.run_async())
    try:
        await await_for(lambda: worker.listening or run.done(), what="the LISTEN connection")
        assert not run.done()
        add_breaking_ledger_row(engine, schema)
        notify_breaking(engine)
        with pytest.raises(DatabaseNewerThanLibrary):
            await asyncio.wait_for(run, TIMEOUT)
    finally:
        if not run.done():
            worker.request_shutdown()
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), TIMEOUT)
        remove_ledger_row(engine, schema)


TASKS = textwrap.dedent(
    """
    from sqla_graphile import task


    @task("noop")
    def noop(payload, ctx):
        return None
    """
)


def listener_ready(engine: Engine) -> bool:
    """Whether a worker's LISTEN session on this database has issued its LISTENs."""
    return bool(
        execute(
            engine,
            "select 1 from pg_stat_activity where datname = current_database() "
            "and application_name = 'sqla_graphile listener' and state = 'idle' "
            "and (query ilike 'listen%' or query = 'select 1')",
        )
    )


def test_cli_run_exits_57_on_a_breaking_migration(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    """``graphile-worker run`` stops with exit status 57 (Node 0.18's) when a breaking
    migration newer than the library lands in its schema's ledger while it runs."""
    (tmp_path / "faults_migrate_tasks.py").write_text(TASKS, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    args = [
        sys.executable,
        "-m",
        "sqla_graphile",
        "--database-url",
        database_url,
        "--schema",
        schema,
        "run",
        "--tasks",
        "faults_migrate_tasks",
        "--poll-interval",
        "100ms",
    ]
    assert not listener_ready(engine), "another worker is listening on this database"
    process = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not listener_ready(engine) and process.poll() is None:
            assert time.monotonic() < deadline, "the CLI worker never started listening"
            time.sleep(0.05)
        assert process.poll() is None
        add_breaking_ledger_row(engine, schema)
        notify_breaking(engine)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        remove_ledger_row(engine, schema)
    assert process.returncode == 57, (process.returncode, stderr[-2000:])
