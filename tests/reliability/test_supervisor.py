"""Supervised worker processes: real processes on a real PostgreSQL.

``graphile-worker run --processes N`` and :func:`sqla_graphile.supervisor.run_processes`
(through ``supervisor_app.py``, run as a script): a killed process is restarted and its
jobs recovered, SIGTERM stops every process gracefully, processes that keep dying stop
the supervisor with status 1, a breaking migration with 57, and the crontab is
scheduled by one process only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, text
from supervisor_app import CRASH_STATUS, App, create_runs_table, runs
from worker_fixtures import wait_for

import sqla_graphile
from sqla_graphile import WorkerUtils
from sqla_graphile.schema import quote_schema, worker_schema
from sqla_graphile.supervisor import Supervisor

ROOT = Path(sqla_graphile.__file__).resolve().parent.parent
APP = Path(__file__).resolve().parents[1] / "supervisor_app.py"
WAIT = 60.0


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "GRAPHILE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def start(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(process: subprocess.Popen[str], sig: int | None = signal.SIGTERM) -> tuple[str, str]:
    """Signal ``process`` (unless ``sig`` is None) and collect its output once it exits."""
    try:
        if sig is not None:
            process.send_signal(sig)
        return process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def registered(engine: Engine, schema: str) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"select worker_id, metadata from {quote_schema(schema)}._sqla_graphile_workers")
        )
        return [dict(row) for row in rows.mappings()]


def listeners(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(
                text(
                    "select count(*) from pg_stat_activity where datname = current_database()"
                    " and application_name = 'sqla_graphile listener'"
                )
            )
        )


def cli(database_url: str, schema: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sqla_graphile",
        "--database-url",
        database_url,
        "--schema",
        schema,
        *args,
    ]


# -- the Python entry point -------------------------------------------------------------------


def run_app(database_url: str, schema: str, cwd: Path, **config: Any) -> subprocess.Popen[str]:
    settings = {"url": database_url, "schema": schema, "processes": 2, **config}
    return start([sys.executable, str(APP), json.dumps(settings)], cwd)


def test_a_killed_process_is_restarted_and_its_job_recovered_and_run(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    create_runs_table(engine, schema)
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job("hold", {"seconds": 600})
    supervisor = run_app(database_url, schema, tmp_path, options={"restart_delay": 0.1})
    try:
        first = wait_for(
            lambda: [r for r in runs(engine, schema) if r["event"] == "start"],
            WAIT,
            "the job to start",
        )[0]
        killed = first["pid"]
        before = {w["worker_id"] for w in registered(engine, schema)}
        os.kill(killed, signal.SIGKILL)

        # Recovered by a sweep once the killed worker's heartbeat is stale, and run again.
        wait_for(lambda: utils.get_job(job.id) is None, WAIT, "the job to be recovered and done")
        # The slot runs again: two workers, one of them new, none in the killed process.
        wait_for(
            lambda: (
                len(now := registered(engine, schema)) == 2
                and {w["worker_id"] for w in now} != before
                and killed not in {w["metadata"]["pid"] for w in now}
            ),
            WAIT,
            "the killed process to be replaced",
        )
    finally:
        _, stderr = finish(supervisor)

    assert supervisor.returncode == 0, stderr
    assert f"(pid {killed}, worker " in stderr
    assert "killed by signal SIGKILL (9)" in stderr
    assert "restarting it in" in stderr
    history = [(r["attempt"], r["event"], r["pid"] == killed) for r in runs(engine, schema)]
    assert history == [(1, "start", True), (2, "start", False), (2, "end", False)]
    assert registered(engine, schema) == []  # both deregistered at the stop


def test_processes_that_keep_crashing_stop_the_supervisor_with_status_1(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    supervisor = run_app(
        database_url,
        schema,
        tmp_path,
        crash=True,
        options={"restart_delay": 0.05, "max_crashes": 3, "crash_window": 600},
    )
    _, stderr = finish(supervisor, sig=None)

    assert supervisor.returncode == 1, stderr
    assert f"exited with status {CRASH_STATUS}" in stderr
    assert "4 worker process deaths within 600 s, more than 3" in stderr
    assert stderr.count("restarting it in") == 3


def test_processes_stop_gracefully_when_their_supervisor_is_killed(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    supervisor = run_app(database_url, schema, tmp_path)
    try:
        workers = wait_for(lambda: len(w := registered(engine, schema)) == 2 and w, WAIT, "workers")
        supervisor.kill()
        supervisor.communicate(timeout=WAIT)
        # Each process sees its supervisor gone, stops gracefully and deregisters.
        wait_for(lambda: registered(engine, schema) == [], WAIT, "the workers to deregister")
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(w["metadata"]["pid"]) for w in workers), WAIT, "the processes")


def test_a_factory_that_cannot_be_sent_to_a_process_is_refused() -> None:
    with pytest.raises(TypeError, match="must be picklable"):
        Supervisor(lambda slot: None, 2)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="processes must be at least 1"):
        Supervisor(App("postgresql://", "s"), 0)


# -- graphile-worker run --processes ----------------------------------------------------------


def recording_tasks(database_url: str, schema: str) -> str:
    """A tasks module whose ``nap`` jobs record their start and end in ``sup_runs``."""
    return textwrap.dedent(
        f"""
        import os
        import time

        from sqlalchemy import text

        from sqla_graphile import task
        from sqla_graphile._urls import engine_from_url

        engine = engine_from_url({database_url!r})
        TABLE = {quote_schema(schema) + ".sup_runs"!r}


        def record(ctx, event):
            with engine.begin() as connection:
                connection.execute(
                    text(f"insert into {{TABLE}} (job_id, attempt, pid, event) "
                         "values (:j, :a, :p, :e)"),
                    {{"j": ctx.job.id, "a": ctx.job.attempts, "p": os.getpid(), "e": event}},
                )


        @task("nap")
        def nap(payload, ctx):
            record(ctx, "start")
            time.sleep(payload["seconds"])
            record(ctx, "end")
        """
    )


def test_sigterm_stops_every_process_after_its_jobs_complete(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    create_runs_table(engine, schema)
    (tmp_path / "nap_tasks.py").write_text(recording_tasks(database_url, schema), "utf-8")
    utils = WorkerUtils(engine, schema)
    supervisor = start(
        cli(
            database_url,
            schema,
            "--json",
            "run",
            "--tasks",
            "nap_tasks",
            "--processes",
            "2",
            "--concurrency",
            "1",
            "--local-queue-size",
            "0",
            "--shutdown-grace-period",
            "60s",
        ),
        tmp_path,
    )
    try:
        wait_for(lambda: len(registered(engine, schema)) == 2, WAIT, "two workers")
        jobs = [utils.add_raw_job("nap", {"seconds": 2}) for _ in range(2)]
        # One job in each process (each runs one at a time), both in flight.
        wait_for(
            lambda: len({r["pid"] for r in runs(engine, schema) if r["event"] == "start"}) == 2,
            WAIT,
            "a job in each process",
        )
        stdout, stderr = finish(supervisor)
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)

    assert supervisor.returncode == 0, stderr
    ended = {r["job_id"] for r in runs(engine, schema) if r["event"] == "end"}
    assert ended == {job.id for job in jobs}
    assert utils.list_jobs() == []
    assert stderr.count("SIGTERM received: shutting down gracefully") == 2
    assert "forcing" not in stderr
    assert registered(engine, schema) == []
    assert json.loads(stdout) == {
        "completed": 2,
        "failed": 0,
        "permanently_failed": 0,
        "processes": 2,
        "restarts": 0,
    }


def test_a_ctrl_c_reaches_each_process_once(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "nap_tasks.py").write_text(recording_tasks(database_url, schema), "utf-8")
    # Its own process group, as a terminal's foreground job: SIGINT goes to the group.
    supervisor = start(
        cli(database_url, schema, "run", "--tasks", "nap_tasks", "--processes", "2"),
        tmp_path,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(registered(engine, schema)) == 2, WAIT, "two workers")
        os.killpg(supervisor.pid, signal.SIGINT)
        _, stderr = finish(supervisor, sig=None)
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)

    assert supervisor.returncode == 0, stderr
    assert stderr.count("SIGINT received: stopping the worker processes gracefully") == 1
    assert stderr.count("SIGTERM received: shutting down gracefully") == 2
    assert "forcing" not in stderr


def test_a_breaking_migration_stops_every_process_with_status_57(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "nap_tasks.py").write_text(recording_tasks(database_url, schema), "utf-8")
    assert listeners(engine) == 0, "another worker listens on this database"
    supervisor = start(
        cli(database_url, schema, "run", "--tasks", "nap_tasks", "--processes", "2"), tmp_path
    )
    migrations = f"{quote_schema(schema)}.migrations"
    try:
        wait_for(lambda: listeners(engine) == 2, WAIT, "both processes listening")
        with engine.begin() as connection:
            connection.execute(text(f"insert into {migrations} (id, breaking) values (21, true)"))
            connection.execute(
                text("select pg_notify('worker:migrate', :p)"),
                {"p": '{"migrationNumber":21,"breaking":true}'},
            )
        _, stderr = finish(supervisor, sig=None)
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)
        with engine.begin() as connection:
            connection.execute(text(f"delete from {migrations} where id = 21"))

    assert supervisor.returncode == 57, stderr
    assert "exited with status 57" in stderr
    assert "restarting it in" not in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("error: the worker schema")


def test_an_unmigrated_schema_fails_before_any_process_starts(
    database_url: str, schema_name: str, tmp_path: Path
) -> None:
    (tmp_path / "nap_tasks.py").write_text(recording_tasks(database_url, schema_name), "utf-8")
    supervisor = start(
        cli(database_url, schema_name, "run", "--tasks", "nap_tasks", "--processes", "2"),
        tmp_path,
    )
    _, stderr = finish(supervisor, sig=None)

    assert supervisor.returncode == 1
    assert "worker process" not in stderr
    assert stderr.startswith("error: ") and "not" in stderr and "migrat" in stderr


CRON_TASKS = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import sqla_graphile.cron

    from sqla_graphile import task

    # Every process that starts a cron scheduler leaves a mark with its pid.
    _run = sqla_graphile.cron.CronScheduler.run


    async def run(self, stop):
        (Path(__file__).parent / "cron-marks" / str(os.getpid())).touch()
        return await _run(self, stop)


    sqla_graphile.cron.CronScheduler.run = run


    @task("nap")
    def nap(payload, ctx):
        pass
    """
)


def test_the_crontab_is_scheduled_by_one_process(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "cron_tasks.py").write_text(CRON_TASKS, "utf-8")
    (tmp_path / "cron-marks").mkdir()
    # A task no worker runs, so its jobs stay to be counted; its minutes are backfilled.
    (tmp_path / "crontab").write_text("* * * * * cron_probe ?fill=3m\n", "utf-8")
    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:
        connection.execute(
            insert(known).values(
                identifier="cron_probe",
                known_since=datetime.now(timezone.utc) - timedelta(hours=1),
            )
        )
    utils = WorkerUtils(engine, schema)
    supervisor = start(
        cli(
            database_url,
            schema,
            "run",
            "--tasks",
            "cron_tasks",
            "--crontab",
            "crontab",
            "--processes",
            "2",
        ),
        tmp_path,
    )
    try:
        wait_for(lambda: len(registered(engine, schema)) == 2, WAIT, "two workers")
        wait_for(
            lambda: len([j for j in utils.list_jobs() if j.task_identifier == "cron_probe"]) >= 3,
            WAIT,
            "the backfilled minutes",
        )
        # Time for a second scheduler, were there one, to start and backfill too.
        time.sleep(2)
        _, stderr = finish(supervisor)
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)

    assert supervisor.returncode == 0, stderr
    marks = [int(mark.name) for mark in (tmp_path / "cron-marks").iterdir()]
    assert len(marks) == 1, marks
    assert stderr.count(", with the crontab") == 1
    minutes = [
        job.payload["_cron"]["ts"]
        for job in utils.list_jobs()
        if job.task_identifier == "cron_probe"
    ]
    assert len(minutes) >= 3
    assert len(set(minutes)) == len(minutes), minutes  # each minute's job inserted once


def test_the_supervisor_serves_the_health_of_every_process(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    from test_health import free_port, get

    (tmp_path / "nap_tasks.py").write_text(recording_tasks(database_url, schema), "utf-8")
    port = free_port()
    supervisor = start(
        cli(
            database_url,
            schema,
            "run",
            "--tasks",
            "nap_tasks",
            "--processes",
            "2",
            "--health-port",
            str(port),
        ),
        tmp_path,
    )
    try:
        ready = wait_for(
            lambda: (answer := get(port, "/readyz")) and answer[0] == 200 and answer,
            WAIT,
            "the processes to be ready",
        )
        live = get(port, "/livez")
        _, stderr = finish(supervisor)
    finally:
        if supervisor.poll() is None:
            finish(supervisor, signal.SIGKILL)

    assert supervisor.returncode == 0, stderr
    assert live is not None and live[0] == 200
    _, body = ready
    assert body["status"] == "ok" and body["stopping"] is False
    assert [p["index"] for p in body["processes"]] == [0, 1]
    assert all(p["ready"] and p["listening"] and p["recovery"] for p in body["processes"])
    assert len({p["worker_id"] for p in body["processes"]}) == 2
