"""A ``def`` handler stuck past its time limit: recycled under the supervisor, reported alone.

A timed-out ``def`` handler that ignores ``ctx.cancellation`` keeps its thread. Once it
has run on for the worker's ``overtime_limit``, a worker process of ``run_processes``
stops gracefully and exits with ``EXIT_RECYCLED``, and the supervisor starts a new
process at once (not counted as a crash); a plain worker logs a warning, reports the job
in ``Worker.status.stuck_jobs`` (``/livez`` fails) and keeps running. Real processes on
a real PostgreSQL; nothing here measures how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from supervisor_app import create_runs_table, runs
from test_health import get
from test_supervisor import WAIT, finish, registered, run_app
from worker_fixtures import await_for, rows, running, wait_for

from sqla_graphile import JobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.health import serve_health
from sqla_graphile.supervisor import EXIT_RECYCLED


def test_a_process_whose_handler_thread_is_stuck_is_recycled_and_its_successor_runs_jobs(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    create_runs_table(engine, schema)
    utils = WorkerUtils(engine, schema)
    stuck = utils.add_raw_job("stuck", {}, JobSpec(max_attempts=1))
    # A long backoff and no crash allowed: a recycle must be neither delayed nor counted.
    options = {"restart_delay": 30, "max_restart_delay": 30, "max_crashes": 0}
    supervisor = run_app(
        database_url, schema, tmp_path, processes=1, overtime_limit=0.5, options=options
    )
    try:
        first = wait_for(
            lambda: [r for r in runs(engine, schema) if r["job_id"] == stuck.id],
            WAIT,
            "the stuck job to start",
        )[0]["pid"]
        failed = wait_for(
            lambda: (job := utils.get_job(stuck.id)) and job.locked_by is None and job,
            WAIT,
            "the stuck job to be failed at its time limit",
        )
        # A new process, with a new worker, replaces the one whose thread is stuck.
        wait_for(
            lambda: [w for w in registered(engine, schema) if w["metadata"]["pid"] != first],
            WAIT,
            "the process to be recycled",
        )
        after = utils.add_raw_job("hold", {"seconds": 0})
        wait_for(lambda: utils.get_job(after.id) is None, WAIT, "the next job to run")
    finally:
        _, stderr = finish(supervisor)

    assert supervisor.returncode == 0, stderr
    assert failed.last_error == "Job timed out after 0.3 s (timeout of task 'stuck')"
    assert failed.attempts == 1
    assert (
        f"worker process 0 recycled: a handler thread of job {stuck.id} (task 'stuck') "
        "was still running 0.5 s after its time limit"
    ) in stderr
    assert f"worker process 0 (pid {first}, worker " in stderr
    assert f"recycled (exited with status {EXIT_RECYCLED}: " in stderr
    assert "restarting it now" in stderr
    assert "restarting it in" not in stderr  # no backoff
    assert "deaths within" not in stderr  # not counted as a crash
    (start, end) = [r for r in runs(engine, schema) if r["job_id"] == after.id]
    assert start["event"] == "start" and end["event"] == "end"
    assert start["pid"] == end["pid"] != first
    assert registered(engine, schema) == []  # the successor deregistered at the stop


async def test_a_plain_worker_reports_a_stuck_handler_thread_and_keeps_running(
    engine: Engine, schema: str, utils: WorkerUtils, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqla_graphile.worker")
    release = threading.Event()
    returned = threading.Event()

    @task("stubborn", timeout=0.3)
    def stubborn(payload: Any, ctx: WorkerContext) -> None:
        try:
            release.wait(WAIT)  # ignores ctx.cancellation
        finally:
            returned.set()

    @task("quick")
    async def quick(payload: Any, ctx: WorkerContext) -> None:
        pass

    job = utils.add_raw_job("stubborn", {})
    # A grace period longer than the wait for the stop: the stuck thread is not waited for.
    worker = Worker(
        engine,
        [stubborn, quick],
        schema=schema,
        concurrency=2,
        overtime_limit=0.4,
        shutdown_grace_period=WAIT * 2,
    )
    assert worker.overtime_limit == 0.4
    server = serve_health(worker, 0)
    port = server.address[1]
    try:
        async with running(worker):
            await await_for(lambda: worker.status.stuck_jobs, what="the stuck handler")
            status = worker.status
            live = await asyncio.to_thread(get, port, "/livez")
            # The worker goes on in its other slot.
            other = utils.add_raw_job("quick", {})
            await await_for(lambda: utils.get_job(other.id) is None, what="the quick job")
            assert worker.running and not worker.status.stopping
        assert not returned.is_set()  # stopped without waiting for the stuck thread
    finally:
        release.set()
    await await_for(returned.is_set, what="the handler to return")

    assert status.stuck_jobs == (job.id,)
    assert not status.live and status.running and not status.stopping
    assert f"handler thread stuck past its time limit (job {job.id})" in status.problems()
    assert live is not None and live[0] == 503
    assert live[1]["worker"]["stuck_jobs"] == [job.id]
    (row,) = rows(engine, schema)
    assert row["last_error"] == "Job timed out after 0.3 s (timeout of task 'stubborn')"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        message.startswith(
            f"a handler thread of job {job.id} (task 'stubborn') was still running 0.4 s "
            "after its time limit; it holds a slot"
        )
        for message in warnings
    ), warnings


async def test_a_stuck_handler_that_returns_is_no_longer_reported(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    release = threading.Event()

    @task("late", timeout=0.3)
    def late(payload: Any, ctx: WorkerContext) -> None:
        release.wait(WAIT)

    utils.add_raw_job("late", {})
    worker = Worker(engine, [late], schema=schema, overtime_limit=0.2)
    try:
        async with running(worker):
            await await_for(lambda: worker.status.stuck_jobs, what="the stuck handler")
            assert not worker.status.live
            release.set()
            await await_for(lambda: worker.status.live, what="live again")
            assert worker.status.stuck_jobs == ()
            assert not [p for p in worker.status.problems() if "stuck" in p]
    finally:
        release.set()


@task("idle")
def idle(payload: Any, ctx: WorkerContext) -> None:
    """Never run here: a worker needs a task."""


@pytest.mark.parametrize("value", [0, -1, float("nan"), "30s"])
def test_a_bad_overtime_limit_is_refused(engine: Engine, schema: str, value: Any) -> None:
    with pytest.raises(ValueError, match="overtime_limit"):
        Worker(engine, [idle], schema=schema, overtime_limit=value)


def test_the_overtime_limit_is_30_s_unless_given(engine: Engine, schema: str) -> None:
    assert Worker(engine, [idle], schema=schema).overtime_limit == 30.0
    assert Worker(engine, [idle], schema=schema, overtime_limit=None).overtime_limit is None
