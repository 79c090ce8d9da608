"""Named queues run one job at a time across every worker; batches lock one job per queue."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from typing import Any

from sqlalchemy import Engine
from worker_fixtures import await_for, execute, rows, running

from sqla_graphile import JobSpec, RawJobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema
from sqla_graphile.sql import statements


async def test_named_queue_serialised_across_workers(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    intervals: list[tuple[str | None, int, float, float]] = []

    @task("timed")
    async def timed(payload: Any, ctx: WorkerContext) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.01)
        intervals.append((ctx.job.queue_name, ctx.job.id, start, time.monotonic()))

    @task("timed_sync")
    def timed_sync(payload: Any, ctx: WorkerContext) -> None:
        start = time.monotonic()
        time.sleep(0.01)
        intervals.append((ctx.job.queue_name, ctx.job.id, start, time.monotonic()))

    specs = [
        RawJobSpec("timed" if n % 2 else "timed_sync", {"n": n}, JobSpec(queue_name=f"q{n % 3}"))
        for n in range(36)
    ] + [RawJobSpec("timed", {"free": n}) for n in range(12)]
    jobs = utils.add_raw_jobs(specs)

    workers = [
        Worker(engine, [timed, timed_sync], schema=schema, concurrency=4, poll_interval=0.05),
        Worker(
            engine,
            [timed, timed_sync],
            schema=schema,
            concurrency=3,
            local_queue_size=0,
            poll_interval=0.05,
        ),
        Worker(
            engine,
            [timed, timed_sync],
            schema=schema,
            concurrency=5,
            local_queue_size=10,
            complete_batch_delay=0.02,
            poll_interval=0.05,
        ),
    ]
    async with running(workers[0]), running(workers[1]), running(workers[2]):
        await await_for(lambda: len(intervals) >= len(jobs), what="all jobs")
        await await_for(lambda: not rows(engine, schema), what="all completions")

    counts = Counter(job_id for _, job_id, _, _ in intervals)
    assert sorted(counts) == sorted(job.id for job in jobs)
    assert set(counts.values()) == {1}  # every job exactly once
    for queue in ("q0", "q1", "q2"):
        spans = sorted((s, e) for q, _, s, e in intervals if q == queue)
        assert len(spans) == 12
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"two jobs of {queue} overlapped"
    queues = execute(engine, f"select * from {quote_schema(schema)}._private_job_queues")
    assert all(q["locked_by"] is None for q in queues)


def test_batch_fetch_locks_one_job_per_named_queue(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    utils.add_raw_jobs(
        [RawJobSpec("t", {"a": n}, JobSpec(queue_name="A", priority=n)) for n in range(4)]
        + [RawJobSpec("t", {"b": n}, JobSpec(queue_name="B")) for n in range(2)]
        + [RawJobSpec("t", {"free": n}) for n in range(3)]
    )
    registry = statements(schema)
    sql = registry.worker
    with engine.begin() as connection:
        ((task_id, _),) = connection.execute(registry.adding.task_ids, {"identifiers": ["t"]}).all()
    params = {"worker_id": "graphile_worker_test", "task_ids": [task_id], "limit": 50}
    with engine.begin() as connection:
        fetched = connection.execute(sql.fetch, params).mappings().all()
    assert Counter(row["queue_name"] for row in fetched) == {None: 3, "A": 1, "B": 1}
    (first_a,) = [row for row in fetched if row["queue_name"] == "A"]
    assert json.loads(first_a["payload"]) == {"a": 0}  # the first of its queue by priority
    assert all(row["attempts"] == 1 and row["task_id"] == task_id for row in fetched)
    queues = execute(engine, f"select * from {quote_schema(schema)}._private_job_queues")
    assert {q["queue_name"]: q["locked_by"] for q in queues} == {
        "A": "graphile_worker_test",
        "B": "graphile_worker_test",
    }
    # While the queues are held, nothing more of them can be fetched, by anyone.
    with engine.begin() as connection:
        again = connection.execute(sql.fetch, {**params, "worker_id": "other"}).all()
    assert again == []
