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
