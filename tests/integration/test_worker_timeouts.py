"""Time limits of jobs: a task's ``timeout`` and the worker's ``job_timeout``.

At its limit a job is failed (attempt counted, retried with the usual backoff); an
``async def`` handler is cancelled, a ``def`` handler signalled through
``ctx.cancellation``, and whatever the handler returns later is not written. Limits are
short (a fraction of a second); nothing here measures how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine
from worker_fixtures import await_for, rows, running

from sqla_graphile import (
    AfterJobRunContext,
    Continue,
    Hooks,
    JobFailEvent,
    JobTimedOut,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)


def only_row(engine: Engine, schema: str) -> dict[str, Any]:
    (row,) = rows(engine, schema)
    return dict(row)


def failed_row(engine: Engine, schema: str) -> dict[str, Any] | None:
    """The single job's row once its failure is written (unlocked, with an error)."""
    found = rows(engine, schema)
    if len(found) == 1 and found[0]["locked_by"] is None and found[0]["last_error"]:
        return dict(found[0])
    return None


@pytest.mark.parametrize("path", ["direct", "intercepted"])
async def test_async_handler_is_cancelled_and_its_job_failed_at_the_limit(
    engine: Engine, schema: str, utils: WorkerUtils, path: str
) -> None:
    cancelled = asyncio.Event()
    failures: list[JobFailEvent] = []
    after_errors: list[BaseException | None] = []

    @task("slow_async", timeout=0.3)
    async def slow_async(payload: Any, ctx: WorkerContext) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    hooks = Hooks()
    hooks.on("job_fail")(failures.append)
    if path == "intercepted":

        @hooks.after_job_run
        def after(ctx: AfterJobRunContext) -> Continue:
            after_errors.append(ctx.error)
            return Continue()

    job = utils.add_raw_job("slow_async", {})
    worker = Worker(engine, [slow_async], schema=schema, hooks=hooks, poll_interval=60.0)
    async with running(worker):
        row = await await_for(lambda: failed_row(engine, schema), what="the timed-out failure")
        await await_for(lambda: failures, what="the job_fail event")
    assert cancelled.is_set()
    assert row["last_error"] == "Job timed out after 0.3 s (timeout of task 'slow_async')"
    assert row["attempts"] == 1
    assert row["run_at"] > job.run_at  # retried after the usual backoff
    (event,) = failures
    assert isinstance(event.exception, JobTimedOut) and event.exception.timeout == 0.3
    assert event.will_retry and event.error == row["last_error"]
    if path == "intercepted":
        assert len(after_errors) == 1 and isinstance(after_errors[0], JobTimedOut)


async def test_def_handler_is_signalled_failed_at_the_limit_and_its_late_return_writes_nothing(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    signalled = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    lock = threading.Lock()
    active = [0, 0]  # now, most ever

    def enter() -> None:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])

    def leave() -> None:
        with lock:
            active[0] -= 1

    @task("stubborn", timeout=timedelta(seconds=0.3))
    def stubborn(payload: Any, ctx: WorkerContext) -> str:
        enter()
        try:
            if ctx.cancellation.wait(30):
                signalled.set()
            release.wait(30)  # runs on past its limit, until the test lets it go
            return "late"
        finally:
            leave()
            returned.set()

    quick_done = asyncio.Event()

    @task("quick")
    async def quick(payload: Any, ctx: WorkerContext) -> None:
        enter()
        leave()
        quick_done.set()

    stubborn_job = utils.add_raw_job("stubborn", {})
    worker = Worker(engine, [stubborn, quick], schema=schema, concurrency=1, poll_interval=60.0)
    async with running(worker):
        row = await await_for(lambda: failed_row(engine, schema), what="the timed-out failure")
        assert signalled.is_set() and not returned.is_set()
        # The handler still runs: its slot stays taken, so the next job waits for it.
        quick_job = utils.add_raw_job("quick", {})
        await asyncio.sleep(0.5)  # time enough to start it, were the slot free
        assert not quick_done.is_set()
        release.set()
        await await_for(quick_done.is_set, what="the quick job run in the freed slot")
        await await_for(lambda: not rows(engine, schema, f"j.id = {quick_job.id}"))
    assert returned.is_set()
    assert active[1] == 1  # never two handlers at once with concurrency 1
    assert row["last_error"] == "Job timed out after 0.3 s (timeout of task 'stubborn')"
    assert row["attempts"] == 1 and row["run_at"] > stubborn_job.run_at
    # The late return wrote nothing over the failure.
    assert only_row(engine, schema) == row


@dataclass
class Report(TaskHandler):
    IDENTIFIER: ClassVar[str] = "report"
    TIMEOUT: ClassVar[timedelta | float | None] = 30.0

    seconds: float

    async def run(self, ctx: WorkerContext) -> None:
        await asyncio.sleep(self.seconds)


@task("plain")
async def plain(payload: Any, ctx: WorkerContext) -> None:
    await asyncio.sleep(payload["seconds"])


def test_a_task_timeout_overrides_the_workers(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    utils.add_job(Report(seconds=0.6))  # past the worker's limit, within the task's
    utils.add_raw_job("plain", {"seconds": 60})
    Worker(engine, [Report, plain], schema=schema, job_timeout=0.2).run_once()
    (row,) = rows(engine, schema)  # the report completed
    assert row["task_identifier"] == "plain"
    assert row["last_error"] == "Job timed out after 0.2 s (the worker's job_timeout)"
    assert row["attempts"] == 1


def test_a_task_class_timeout_applies_without_a_worker_limit(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    class ShortReport(Report):
        TIMEOUT = timedelta(milliseconds=200)

    utils.add_job(ShortReport(seconds=60))
    Worker(engine, [ShortReport], schema=schema).run_once()
    row = only_row(engine, schema)
    assert row["last_error"] == "Job timed out after 0.2 s (timeout of task 'report')"


def test_no_time_limit_by_default(engine: Engine, schema: str, utils: WorkerUtils) -> None:
    utils.add_raw_job("plain", {"seconds": 1.0})
    worker = Worker(engine, [plain], schema=schema)
    assert worker.job_timeout is None and worker.tasks["plain"].timeout is None
    worker.run_once()
    assert rows(engine, schema) == []  # completed


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "5s", True])
def test_bad_time_limits_are_refused(engine: Engine, schema: str, value: Any) -> None:
    with pytest.raises(ValueError, match="job_timeout"):
        Worker(engine, [plain], schema=schema, job_timeout=value)
    with pytest.raises(ValueError, match="timeout of task 'x'"):
        task("x", timeout=value)

    class Bad(Report):
        TIMEOUT = value

    with pytest.raises(ValueError, match=r"Bad\.TIMEOUT"):
        Worker(engine, [Bad], schema=schema)


CLI_TASKS = """
import asyncio

from sqla_graphile import task


@task("nap")
async def nap(payload, ctx):
    await asyncio.sleep(60)
"""


def cli(database_url: str, schema: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    command = [sys.executable, "-m", "sqla_graphile", "--database-url", database_url]
    command += ["--schema", schema, "run", "--tasks", "cli_nap_tasks", "--once", *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_run_job_timeout(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils, tmp_path: Path
) -> None:
    (tmp_path / "cli_nap_tasks.py").write_text(CLI_TASKS, encoding="utf-8")
    utils.add_raw_job("nap", {})
    refused = cli(database_url, schema, tmp_path, "--job-timeout", "0s")
    assert refused.returncode == 2  # a usage error, as every zero duration where one is needed
    assert "'--job-timeout'" in refused.stderr and "'0s' must be longer than 0" in refused.stderr
    assert only_row(engine, schema)["attempts"] == 0  # nothing ran

    result = cli(database_url, schema, tmp_path, "--job-timeout", "300ms")
    assert result.returncode == 0, result.stderr
    row = only_row(engine, schema)
    assert row["last_error"] == "Job timed out after 0.3 s (the worker's job_timeout)"
    assert row["attempts"] == 1
