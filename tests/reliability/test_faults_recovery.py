"""Crash recovery keeps the interrupted attempt: a job that kills its worker each time
runs out of attempts instead of being re-run for ever."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import await_for, execute, running

import sqla_graphile
from sqla_graphile import (
    JobSpec,
    SweepStaleWorkersOptions,
    Worker,
    WorkerContext,
    WorkerRecoveryConfig,
    WorkerUtils,
    task,
)
from sqla_graphile.schema import quote_schema

#: The checkout this test imports the library from (subprocesses must use it too).
ROOT = Path(sqla_graphile.__file__).resolve().parent.parent

#: Short intervals, so a dead worker is recovered within seconds.
FAST = WorkerRecoveryConfig(
    enabled=True,
    heartbeat_interval=timedelta(seconds=0.2),
    sweep_interval=timedelta(seconds=0.3),
    sweep_threshold=timedelta(seconds=1),
    recovery_delay=timedelta(seconds=0.2),
)


def note(worker_id: str) -> str:
    return f"Job recovered after worker {worker_id} stopped heartbeating"


def register(engine: Engine, schema: str, worker_id: str, age: str) -> None:
    """A registry row whose last heartbeat was ``age`` ago (a dead worker's)."""
    execute(
        engine,
        f"insert into {quote_schema(schema)}._sqla_graphile_workers "
        "(worker_id, started_at, last_heartbeat_at) values "
        "(:w, now() - cast(:age as interval), now() - cast(:age as interval))",
        w=worker_id,
        age=age,
    )


def lock(engine: Engine, schema: str, job_id: int, holder: str, attempts: int) -> None:
    """Lock a job as ``holder`` did ten minutes ago, having fetched it ``attempts`` times."""
    execute(
        engine,
        f"update {quote_schema(schema)}._private_jobs set locked_by = :h, "
        "locked_at = now() - interval '10 minutes', attempts = :a where id = :id",
        h=holder,
        a=attempts,
        id=job_id,
    )


def job_state(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    found = execute(
        engine,
        "select id, attempts, max_attempts, locked_by, last_error, run_at > now() as later, "
        f"is_available from {quote_schema(schema)}._private_jobs where id = :id",
        id=job_id,
    )
    return dict(found[0]) if found else None


def registered(engine: Engine, schema: str) -> set[str]:
    found = execute(engine, f"select worker_id from {quote_schema(schema)}._sqla_graphile_workers")
    return {row["worker_id"] for row in found}


def test_sweep_keeps_the_attempt(engine: Engine, schema: str, utils: WorkerUtils) -> None:
    """A sweep unlocks a dead worker's job with its attempts unchanged, the recovery note
    as ``last_error`` and ``run_at`` pushed by the recovery delay."""
    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t", {}, JobSpec(max_attempts=5))
    lock(engine, schema, job.id, "dead-w", attempts=2)
    result = utils.sweep_stale_workers(SweepStaleWorkersOptions(recovery_delay=timedelta(hours=1)))
    assert (result.worker_ids, result.job_ids) == (["dead-w"], [job.id])
    row = job_state(engine, schema, job.id)
    assert row is not None
    assert (row["locked_by"], row["last_error"], row["later"]) == (None, note("dead-w"), True)
    assert row["attempts"] == 2, "the interrupted attempt was refunded"


async def test_worker_reruns_a_recovered_job_with_its_attempt_counted(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    """A worker with recovery sweeps a dead worker's job and re-runs it as the next
    attempt (the crashed one still counts)."""
    seen: list[tuple[int, str | None]] = []

    @task("t")
    async def record(payload: Any, ctx: WorkerContext) -> None:
        seen.append((ctx.job.attempts, ctx.job.last_error))

    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t", {}, JobSpec(max_attempts=5))
    lock(engine, schema, job.id, "dead-w", attempts=1)
    worker = Worker(async_engine, [record], schema=schema, poll_interval=0.1, recovery=FAST)
    async with running(worker) as run:
        await await_for(
            lambda: job_state(engine, schema, job.id) is None or run.done(), what="the re-run"
        )
        assert not run.done()
    assert seen == [(2, note("dead-w"))]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import timedelta

    from sqla_graphile import Worker, WorkerRecoveryConfig, task

    url, schema = sys.argv[1], sys.argv[2]
    config = WorkerRecoveryConfig(
        enabled=True,
        heartbeat_interval=timedelta(seconds=0.2),
        sweep_interval=timedelta(seconds=0.3),
        sweep_threshold=timedelta(seconds=1),
        recovery_delay=timedelta(seconds=0.2),
    )


    @task("crash")
    def crash(payload, ctx):
        print("RAN", ctx.job.id, ctx.job.attempts, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


    worker = Worker(url, [crash], schema=schema, poll_interval=0.1, recovery=config)
    print("WORKER", worker.worker_id, flush=True)
    worker.run()
    """
)


def run_killer(database_url: str, schema: str) -> tuple[int, list[str]]:
    """Run a worker process whose ``crash`` handler SIGKILLs it; its exit code and output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLER, database_url, schema],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stdout.splitlines()


async def test_job_killing_its_worker_reaches_max_attempts_and_stops(
    engine: Engine, async_engine: AsyncEngine, database_url: str, schema: str, utils: WorkerUtils
) -> None:
    """A job whose handler kills its worker process (SIGKILL) each time is recovered with
    its attempt kept: after ``max_attempts`` crashes it is no longer run."""
    job = utils.add_raw_job("crash", {}, JobSpec(max_attempts=2))
    runs: list[str] = []
    for attempt in (1, 2):
        # Each worker process recovers the previous one's job (if any), runs it, dies.
        code, lines = await asyncio.to_thread(run_killer, database_url, schema)
        assert code == -9, lines
        runs += [line for line in lines if line.startswith("RAN ")]
        assert runs[-1] == f"RAN {job.id} {attempt}", runs
    row = job_state(engine, schema, job.id)
    assert row is not None and row["attempts"] == 2 and row["locked_by"] is not None

    # A last worker recovers the second crash: out of attempts, the job must not run.
    ran: list[tuple[str, int]] = []
    lock_ = threading.Lock()

    @task("crash")
    def survive(payload: Any, ctx: WorkerContext) -> None:
        with lock_:
            ran.append((json.dumps(payload), ctx.job.id))

    dead = row["locked_by"]
    worker = Worker(async_engine, [survive], schema=schema, poll_interval=0.1, recovery=FAST)
    async with running(worker):
        await await_for(
            lambda: dead not in registered(engine, schema), what="the last crash to be swept"
        )
        await await_for(
            lambda: not (job_state(engine, schema, job.id) or {"later": False})["later"],
            what="the recovery delay to pass",
        )
        # Behind the crashed job in fetch order: once it ran, the crashed job had its chance.
        sentinel = utils.add_raw_job("crash", {"sentinel": True}, JobSpec(priority=10))
        await await_for(lambda: job_state(engine, schema, sentinel.id) is None, what="sentinel")
    assert [job_id for _, job_id in ran] == [sentinel.id], "the crashing job was run again"
    row = job_state(engine, schema, job.id)
    assert row is not None
    assert (row["attempts"], row["locked_by"], row["last_error"]) == (2, None, note(dead))
