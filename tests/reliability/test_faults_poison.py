"""Poison rows: a fetched job the worker cannot decode fails alone; its fetch-mates run."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import await_for, execute, running

from sqla_graphile import JobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema

DECODE_ERROR = "Job could not be decoded by the worker: "

#: How each poison row is made, as the SET clause of an UPDATE of ``_private_jobs``.
POISONS = {
    # Far deeper than Python's JSON decoder can recurse; PostgreSQL accepts it.
    "payload_nested_5000_deep": "payload = cast(repeat('[', 5000) || repeat(']', 5000) as json)",
    # Neither has a Python datetime: both lie before year 1 in UTC.
    "run_at_minus_infinity": "run_at = '-infinity'",
    "run_at_before_year_one_in_utc": "run_at = '0001-01-01 00:00:00+05'",
}


def job_states(engine: Engine, schema: str) -> dict[int, dict[str, Any]]:
    """Every job's state, without the columns a poison row holds (never decoded here)."""
    found = execute(
        engine,
        "select id, attempts, max_attempts, locked_by, last_error "
        f"from {quote_schema(schema)}._private_jobs order by id",
    )
    return {row["id"]: dict(row) for row in found}


def held_by(engine: Engine, schema: str, worker_id: str) -> list[tuple[str, Any]]:
    """Jobs and queues still locked by ``worker_id``."""
    s = quote_schema(schema)
    jobs = execute(engine, f"select id from {s}._private_jobs where locked_by = :w", w=worker_id)
    queues = execute(
        engine, f"select queue_name from {s}._private_job_queues where locked_by = :w", w=worker_id
    )
    return [("job", r["id"]) for r in jobs] + [("queue", r["queue_name"]) for r in queues]


@pytest.mark.parametrize("poison", list(POISONS))
async def test_poison_row_fails_alone_and_the_rest_of_its_fetch_runs(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils, poison: str
) -> None:
    """A row that cannot be decoded is failed by itself (unlocked, with the decode error,
    its attempt counted); the 20 jobs fetched with it all run, and after a graceful
    shutdown the worker holds no job and no queue."""
    ran: list[int] = []
    lock = threading.Lock()

    @task("work")
    def work(payload: Any, ctx: WorkerContext) -> None:
        with lock:
            ran.append(ctx.job.id)

    good = [utils.add_raw_job("work", {"n": n}) for n in range(20)]
    bad = utils.add_raw_job("work", {"n": "bad"}, JobSpec(queue_name="poison", max_attempts=1))
    execute(
        engine,
        f"update {quote_schema(schema)}._private_jobs set {POISONS[poison]} where id = :id",
        id=bad.id,
    )
    # Everything is there before the worker starts: its first fetch takes all 21 rows.
    worker = Worker(async_engine, [work], schema=schema, concurrency=4, poll_interval=0.1)
    async with running(worker) as task_:
        await await_for(
            lambda: set(job_states(engine, schema)) == {bad.id} or task_.done(),
            what="the 20 decodable jobs of the fetch to complete",
        )
        assert not task_.done()
        await await_for(
            lambda: job_states(engine, schema)[bad.id]["locked_by"] is None,
            what="the poison job to be failed and unlocked",
        )
    states = job_states(engine, schema)
    assert list(states) == [bad.id]
    row = states[bad.id]
    assert row["last_error"] is not None and row["last_error"].startswith(DECODE_ERROR)
    assert row["locked_by"] is None
    assert row["attempts"] == 1  # the fetch's count: not refunded, not counted twice
    assert sorted(ran) == sorted(job.id for job in good)
    assert held_by(engine, schema, worker.worker_id) == []
