"""``graphile-worker run``: a real worker process started from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sqla_graphile import JobSpec, WorkerUtils
from sqla_graphile.schema import quote_schema

TASKS = textwrap.dedent(
    """
    from dataclasses import dataclass
    from typing import ClassVar

    from sqla_graphile import TaskHandler, task


    @dataclass
    class Greet(TaskHandler):
        IDENTIFIER: ClassVar[str] = "greet"
        name: str

        def run(self, ctx):
            ctx.logger.info("hello %s", self.name)


    @task("explode")
    def explode(payload, ctx):
        raise RuntimeError("boom")
    """
)


def command(database_url: str, schema: str, *args: str) -> list[str]:
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


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_run_tasks.py").write_text(TASKS, encoding="utf-8")
    return tmp_path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def count_jobs(engine: Engine, schema: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(text(f"select count(*) from {quote_schema(schema)}._private_jobs"))
        )


def test_run_once_runs_the_jobs_and_reports_progress(
    engine: Engine, database_url: str, schema: str, app_dir: Path
) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job("greet", {"name": "Ada"})
    utils.add_raw_job("greet", {"name": "Grace"})
    failing = utils.add_raw_job("explode", {}, JobSpec(max_attempts=1))

    result = run(
        command(database_url, schema, "run", "--tasks", "cli_run_tasks", "--once"), app_dir
    )

    assert result.returncode == 0, result.stderr
    assert "summary: 2 done, 1 failed (1 for good)" in result.stderr
    assert "hello Ada" in result.stderr and "hello Grace" in result.stderr
    assert "Worker stopped: 2 done, 1 failed" in result.stdout
    # Only the permanently failed job is left, with the handler's error.
    remaining = utils.get_job(failing.id)
    assert count_jobs(engine, schema) == 1
    assert remaining is not None and remaining.last_error is not None
    assert "RuntimeError: boom" in remaining.last_error


def test_run_once_in_json_mode_prints_the_counts(
    engine: Engine, database_url: str, schema: str, app_dir: Path
) -> None:
    WorkerUtils(engine, schema).add_raw_job("greet", {"name": "Lin"})

    result = run(
        command(database_url, schema, "--json", "run", "--tasks", "cli_run_tasks:Greet", "--once"),
        app_dir,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"completed": 1, "failed": 0, "permanently_failed": 0}


def test_run_with_an_unimportable_module_is_a_usage_error(
    database_url: str, schema: str, app_dir: Path
) -> None:
    result = run(
        command(database_url, schema, "run", "--tasks", "no_such_module", "--once"), app_dir
    )

    assert result.returncode == 2
    assert "cannot import 'no_such_module'" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_bad_crontab_names_the_line_and_field(
    database_url: str, schema: str, app_dir: Path
) -> None:
    crontab = app_dir / "crontab"
    crontab.write_text("# nightly\n61 * * * * greet\n", encoding="utf-8")

    result = run(
        command(database_url, schema, "run", "--tasks", "cli_run_tasks", "--crontab", str(crontab)),
        app_dir,
    )

    assert result.returncode == 2
    assert "line 2" in result.stderr and "minute" in result.stderr


def test_run_with_recovery_registers_and_deregisters_on_sigterm(
    engine: Engine, database_url: str, schema: str, app_dir: Path
) -> None:
    crontab = app_dir / "crontab"
    crontab.write_text("0 4 * * * greet {name: 'cron'}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    process = subprocess.Popen(
        command(
            database_url,
            schema,
            "run",
            "--tasks",
            "cli_run_tasks",
            "--crontab",
            str(crontab),
            "--recovery",
        ),
        cwd=app_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    registry = f"{quote_schema(schema)}._sqla_graphile_workers"
    try:
        deadline = time.monotonic() + 60
        registered, known = 0, []
        # Registered in the heartbeat registry, and its crontab item recorded as known.
        while time.monotonic() < deadline and not (registered and known):
            with engine.connect() as connection:
                registered = int(connection.scalar(text(f"select count(*) from {registry}")))
                known = list(
                    connection.scalars(
                        text(
                            f"select identifier from {quote_schema(schema)}._private_known_crontabs"
                        )
                    )
                )
            time.sleep(0.1)
        assert registered == 1
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert "Worker stopped" in stdout
    assert known == ["greet"]
    with engine.connect() as connection:
        assert int(connection.scalar(text(f"select count(*) from {registry}"))) == 0


SLOW_TASKS = textwrap.dedent(
    """
    import asyncio

    from sqla_graphile import task


    @task("hang")
    async def hang(payload, ctx):
        await asyncio.sleep(3600)


    @task("quick")
    def quick(payload, ctx):
        pass
    """
)


def test_run_once_on_an_unreachable_database_prints_the_error_line_alone(app_dir: Path) -> None:
    url = "postgresql://operator:pw-S3cret@127.0.0.1:1/jobs?sslpassword=S3cret-too"
    argv = [sys.executable, "-m", "sqla_graphile", "--database-url", url]
    result = run([*argv, "run", "--tasks", "cli_run_tasks", "--once"], app_dir)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the database at postgresql+psycopg://")
    assert "S3cret" not in result.stderr


def test_run_once_leaves_the_jobs_of_a_forbidden_flag(
    engine: Engine, database_url: str, schema: str, app_dir: Path
) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job("greet", {"name": "Ada"})
    held = utils.add_raw_job("greet", {"name": "Bob"}, JobSpec(flags=["bulk"]))
    other = utils.add_raw_job("greet", {"name": "Cy"}, JobSpec(flags=["nightly"]))

    result = run(
        command(
            database_url,
            schema,
            "--json",
            "run",
            "--tasks",
            "cli_run_tasks",
            "--once",
            "--forbidden-flag",
            "bulk",
            "--forbidden-flag",
            "nightly",
        ),
        app_dir,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completed"] == 1
    assert {job.id for job in utils.list_jobs()} == {held.id, other.id}
    left = utils.get_job(held.id)
    assert left is not None and left.attempts == 0


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        process.send_signal(signal.SIGTERM)
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_run_cancels_running_jobs_after_the_shutdown_grace_period(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "slow_tasks.py").write_text(SLOW_TASKS, encoding="utf-8")
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job("hang", {})
    process = _start(
        command(
            database_url,
            schema,
            "run",
            "--tasks",
            "slow_tasks",
            "--shutdown-grace-period",
            "250ms",
            "--poll-interval",
            "100ms",
        ),
        tmp_path,
    )
    try:

        def locked() -> bool:
            current = utils.get_job(job.id)
            return current is not None and current.locked_by is not None

        _wait_for(locked, "the job to start")
    finally:
        stdout, stderr = _stop(process)

    assert process.returncode == 0, stderr
    failed = utils.get_job(job.id)
    assert failed is not None and failed.last_error is not None
    assert "job cancelled after the 0.25 s grace period" in failed.last_error
    assert "Worker stopped: 0 done, 1 failed" in stdout


def _listeners(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(
                text(
                    "select count(*) from pg_stat_activity where datname = current_database()"
                    " and application_name = 'sqla_graphile listener'"
                )
            )
        )


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "no-listen"])
def test_run_listens_unless_told_not_to(
    engine: Engine, database_url: str, schema: str, app_dir: Path, listen: bool
) -> None:
    utils = WorkerUtils(engine, schema)
    assert _listeners(engine) == 0
    process = _start(
        command(
            database_url,
            schema,
            "run",
            "--tasks",
            "cli_run_tasks",
            "--poll-interval",
            "100ms",
            *([] if listen else ["--no-listen"]),
        ),
        app_dir,
    )
    try:
        # A job added once the worker runs is done either way: notified or polled.
        _wait_for(lambda: _registered(engine, schema), "the worker to register")
        job = utils.add_raw_job("greet", {"name": "Ada"})
        _wait_for(lambda: utils.get_job(job.id) is None, "the job to be done")
        if listen:
            _wait_for(lambda: _listeners(engine) == 1, "the listener")
        listeners = _listeners(engine)
    finally:
        _, stderr = _stop(process)

    assert process.returncode == 0, stderr
    assert listeners == (1 if listen else 0)


def _registered(engine: Engine, schema: str) -> bool:
    with engine.connect() as connection:
        registry = f"{quote_schema(schema)}._sqla_graphile_workers"
        return bool(connection.scalar(text(f"select count(*) from {registry}")))


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("raise RuntimeError('misconfigured')\n", "cannot import 'bad_tasks': RuntimeError"),
        ("tasks = [42]\n", "--tasks"),
    ],
    ids=["raises-on-import", "not-a-handler"],
)
def test_run_with_a_broken_tasks_module_is_a_usage_error(
    database_url: str, schema: str, tmp_path: Path, source: str, fragment: str
) -> None:
    # The application's own mistakes, not the library's: a usage error, no traceback.
    (tmp_path / "bad_tasks.py").write_text(source, encoding="utf-8")
    result = run(command(database_url, schema, "run", "--tasks", "bad_tasks", "--once"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
