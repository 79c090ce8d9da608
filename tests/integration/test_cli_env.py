"""``graphile-worker run`` configured from environment variables alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
from sqlalchemy import Engine

import sqla_graphile
from sqla_graphile import JobSpec, WorkerUtils
from sqla_graphile.cli import main

ROOT = Path(sqla_graphile.__file__).resolve().parent.parent

TASKS = textwrap.dedent(
    """
    from sqla_graphile import task


    @task("env_greet")
    def greet(payload, ctx):
        ctx.logger.info("hello %s", payload["name"])
    """
)


def test_every_run_option_has_its_environment_variable() -> None:
    command = main.commands["run"]
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "json"]
    assert options
    for option in options:
        long_name = next(o for o in option.opts if o.startswith("--"))
        expected = "GRAPHILE_WORKER_" + long_name[2:].upper().replace("-", "_")
        if option.multiple:  # --forbidden-flag: the variable holds several flags
            expected += "S"
        assert option.envvar == expected, long_name
        assert option.show_envvar, long_name


def test_run_takes_its_options_from_the_environment(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "env_tasks.py").write_text(TASKS, encoding="utf-8")
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job("env_greet", {"name": "Ada"})
    bulk = utils.add_raw_job("env_greet", {"name": "Bob"}, JobSpec(flags=["bulk"]))
    nightly = utils.add_raw_job("env_greet", {"name": "Cy"}, JobSpec(flags=["nightly"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHILE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=database_url,
        GRAPHILE_WORKER_SCHEMA=schema,
        GRAPHILE_WORKER_TASKS="env_tasks",
        GRAPHILE_WORKER_ONCE="true",
        GRAPHILE_WORKER_CONCURRENCY="3",
        GRAPHILE_WORKER_FORBIDDEN_FLAGS="bulk nightly",
        GRAPHILE_WORKER_RECOVERY="false",
        GRAPHILE_WORKER_POLL_INTERVAL="250ms",
    )

    result = subprocess.run(
        [sys.executable, "-m", "sqla_graphile", "--json", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completed"] == 1
    assert "hello Ada" in result.stderr
    assert "concurrency 3" in result.stderr
    assert "registered for crash recovery" not in result.stderr
    assert {job.id for job in utils.list_jobs()} == {bulk.id, nightly.id}
