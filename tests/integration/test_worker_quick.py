"""An idle worker locks a notified job from its socket callbacks (the quick fetch)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from worker_fixtures import (
    await_for,
    execute,
    fetch_session,
    rows,
    running,
)

from sqla_graphile import JobSpec, Worker, WorkerContext, WorkerUtils, task

PREPARED = "PREPARE sqla_graphile_fetch_%"


def last_statement(engine: Engine, pid: int) -> tuple[str, Any]:
    """The last statement a session ran (as ``pg_stat_activity`` shows it) and when."""
    (row,) = execute(
        engine, "select query, query_start from pg_stat_activity where pid = :pid", pid=pid
    )
    return row["query"], row["query_start"]


async def add_and_see_it_fetched_quickly(
    engine: Engine, pid: int, add: Callable[[], Any], started: Callable[[], Any]
) -> None:
    """Add a job, wait until its handler ``started``; then the fetch session ``pid``'s
    last statement must be its prepared fetch, run after the add."""
    (before,) = execute(engine, "select clock_timestamp() as at")
    add()
    await await_for(started, what="the handler")
    query, ran_at = last_statement(engine, pid)
    assert query.startswith("PREPARE sqla_graphile_fetch_") and ran_at > before["at"]


async def test_notified_job_is_locked_by_the_prepared_fetch(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    @task("held")
    async def held(payload: Any, ctx: WorkerContext) -> None:
        entered.set()
        await release.wait()

    worker = Worker(engine, [held], schema=schema, poll_interval=600)
    async with running(worker):
        pid = await await_for(lambda: fetch_session(worker), what="an idle fetcher")
        await add_and_see_it_fetched_quickly(
            engine, pid, lambda: utils.add_raw_job("held", {}), entered.is_set
        )
        (job,) = rows(engine, schema)
        assert job["locked_by"] == worker.worker_id and job["attempts"] == 1
        release.set()
        await await_for(lambda: not rows(engine, schema), what="completion")
    worker.close()


async def test_quick_fetch_on_a_dead_connection_falls_back(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    done: list[int] = []
    release = asyncio.Event()

    @task("counted")
    async def counted(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload["n"])
        if payload["n"] == 2:
            await release.wait()  # nothing else runs on the fetch session meanwhile

    worker = Worker(engine, [counted], schema=schema, poll_interval=600)
    async with running(worker):
        pid = await await_for(lambda: fetch_session(worker), what="an idle fetcher")
        execute(engine, "select pg_terminate_backend(:pid)", pid=pid)
        utils.add_raw_job("counted", {"n": 1})
        await await_for(lambda: done == [1], what="the job after the connection died")
        # A new connection, prepared again, serves the next notification.
        new_pid = await await_for(
            lambda: (fetch_session(worker) or pid) != pid and fetch_session(worker),
            what="a new idle fetcher",
        )
        await add_and_see_it_fetched_quickly(
            engine, new_pid, lambda: utils.add_raw_job("counted", {"n": 2}), lambda: done == [1, 2]
        )
        release.set()
        await await_for(lambda: not rows(engine, schema), what="completions")
    worker.close()


async def test_notified_jobs_of_a_named_queue_run_one_at_a_time(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    intervals: list[tuple[int, float, float]] = []

    @task("queued")
    async def queued(payload: Any, ctx: WorkerContext) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.01)
        intervals.append((ctx.job.id, start, time.monotonic()))

    workers = [Worker(engine, [queued], schema=schema, concurrency=2) for _ in range(3)]
    async with running(workers[0]), running(workers[1]), running(workers[2]):
        for worker in workers:
            await await_for(lambda w=worker: w.listening, what="LISTEN")
        jobs = []
        for n in range(20):  # one notification each, to three idle workers
            jobs.append(utils.add_raw_job("queued", {"n": n}, JobSpec(queue_name="only")))
            await asyncio.sleep(0.005)
        await await_for(lambda: len(intervals) >= len(jobs), what="all jobs")
        await await_for(lambda: not rows(engine, schema), what="all completions")
    for worker in workers:
        worker.close()
    assert Counter(job_id for job_id, _, _ in intervals) == {job.id: 1 for job in jobs}
    spans = sorted((start, end) for _, start, end in intervals)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two jobs of one queue overlapped"
