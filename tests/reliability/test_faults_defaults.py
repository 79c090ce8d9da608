"""The worker's defaults strand no work: crash recovery is on wherever the schema has the
worker registry, and the default local queue holds little work, so an urgent job is not
held back behind a long queue of slow ones."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import Engine
from worker_fixtures import await_for, execute, rows, running

from sqla_graphile import JobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema


def registered(engine: Engine, schema: str) -> list[str]:
    found = execute(engine, f"select worker_id from {quote_schema(schema)}._sqla_graphile_workers")
    return [row["worker_id"] for row in found]


@task("noop_default")
def noop_default(payload: Any, ctx: WorkerContext) -> None:
    """Does nothing."""


async def test_recovery_is_on_by_default(engine: Engine, schema: str) -> None:
    """A worker given no recovery settings registers for crash recovery (so a kill -9
    strands nothing for Node's 4 hours), and deregisters after a clean stop."""
    worker = Worker(engine, [noop_default], schema=schema, poll_interval=60)
    async with running(worker):
        assert registered(engine, schema) == [worker.worker_id]
    assert registered(engine, schema) == []


async def test_recovery_is_off_by_default_without_a_registry(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    """On a schema without the registry (migrated by Node alone), the default worker runs
    without recovery instead of refusing to start."""
    execute(engine, f"drop table {quote_schema(schema)}._sqla_graphile_workers")
    utils.add_raw_job("noop_default", {})
    worker = Worker(engine, [noop_default], schema=schema, poll_interval=0.1)
    async with running(worker):
        await await_for(lambda: not rows(engine, schema), what="the job")


async def test_an_urgent_job_is_not_held_back_by_the_default_local_queue(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    """Behind a backlog of slow jobs, a priority -100 job added later starts after few of
    them: the default local queue holds about 0.1 s of recent throughput (here ~100
    jobs/s, so ~10 jobs), and more urgent jobs go ahead of those queued. The old default
    held 100 such jobs ahead of it."""
    started: list[int] = []
    lock = threading.Lock()

    @task("slow_default")
    def slow_default(payload: Any, ctx: WorkerContext) -> None:
        with lock:
            started.append(payload["n"])
        time.sleep(0.02)

    for n in range(300):
        utils.add_raw_job("slow_default", {"n": n})
    concurrency = 2
    worker = Worker(
        engine, [slow_default], schema=schema, concurrency=concurrency, poll_interval=0.2
    )
    async with running(worker):
        await await_for(lambda: len(started) >= 60, what="the backlog under way")
        with lock:
            before = len(started)
        utils.add_raw_job("slow_default", {"n": -1}, JobSpec(priority=-100))
        await await_for(lambda: -1 in started, what="the urgent job")
        ahead = started.index(-1) - before
        worker.request_shutdown()
    # Jobs already handed to the threads (4 per thread), plus what the queue held.
    assert ahead <= concurrency * 4 + 20, f"{ahead} jobs started ahead of the urgent one"
