"""Mixed fleets, failures: a job failed by one side is retried by the other.

Both sides fail with Node's arithmetic, ``run_at = greatest(now(), run_at) +
exp(least(attempts, 10))`` seconds, in the failing statement, which runs after the task
started (``clock_timestamp()`` recorded by the task) and before the row is read.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import pytest
from interop_fixtures import NodeProcess, log_rows, make_log, recording_task
from sqlalchemy import Engine, text
from worker_fixtures import make_due, rows

from sqla_graphile import JobSpec, Worker, WorkerUtils
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

NODE_ERROR = "boom from node"
PYTHON_ERROR = "boom from python"
MICROSECOND = timedelta(microseconds=1)


def job_row(engine: Engine, schema: str, job_id: int) -> dict[str, Any]:
    (row,) = rows(engine, schema, f"j.id = {job_id}")
    return dict(row)


def db_now(engine: Engine) -> datetime:
    with engine.connect() as connection:
        value: datetime = connection.scalar(text("select now()"))
        return value


def assert_backed_off(
    row: dict[str, Any], run_at_before: datetime, started: datetime, read_at: datetime
) -> None:
    """``run_at`` is Node's backoff from a ``now()`` between the task's start and the read."""
    delay = timedelta(seconds=math.exp(min(row["attempts"], 10)))
    failed_at = row["run_at"] - delay
    # greatest(now(), run_at): never earlier than the run_at it had.
    assert failed_at >= run_at_before - MICROSECOND
    assert started - MICROSECOND <= failed_at <= read_at + MICROSECOND, (
        f"run_at {row['run_at']} is not {delay} after a failure between {started} and {read_at}"
    )
    assert row["locked_at"] is None and row["locked_by"] is None


async def run_node_once(node: NodeProcess, schema: str, log: str) -> None:
    await node.acall("runOnce", schema=schema, tasks={"flaky": {"log": log, "fail": NODE_ERROR}})


async def run_python_once(engine: Engine, schema: str, log: str) -> None:
    worker = Worker(engine, [recording_task("flaky", log, fail=PYTHON_ERROR)], schema=schema)
    await worker.run_once_async()


def started_at(engine: Engine, log: str, job_id: int, attempt: int, who: str) -> datetime:
    (run,) = log_rows(engine, log, f"job_id = {job_id} and attempt = {attempt}")
    assert run["who"] == who
    started: datetime = run["started"]
    return started


async def test_a_job_failed_on_one_side_is_retried_by_the_other(
    node: NodeProcess, engine: Engine, schema: str
) -> None:
    log = make_log(engine, schema)
    job = WorkerUtils(engine, schema).add_raw_job(
        "flaky", {"retry": "me"}, JobSpec(queue_name="fq", max_attempts=3)
    )

    # Attempt 1: Node fails it.
    await run_node_once(node, schema, log)
    first = job_row(engine, schema, job.id)
    assert (first["attempts"], first["last_error"]) == (1, NODE_ERROR)
    assert_backed_off(first, job.run_at, started_at(engine, log, job.id, 1, "node"), db_now(engine))
    assert first["updated_at"] == job.updated_at, "failing does not touch updated_at"

    # Attempt 2: our worker retries it and fails it the same way.
    make_due(engine, schema)
    due = job_row(engine, schema, job.id)["run_at"]
    await run_python_once(engine, schema, log)
    second = job_row(engine, schema, job.id)
    assert second["attempts"] == 2
    assert second["last_error"].startswith(f"RuntimeError: {PYTHON_ERROR}")
    assert_backed_off(second, due, started_at(engine, log, job.id, 2, "python"), db_now(engine))
    assert second["updated_at"] == job.updated_at

    # Attempt 3, the last: Node again; the job is now failed for good.
    make_due(engine, schema)
    due = job_row(engine, schema, job.id)["run_at"]
    await run_node_once(node, schema, log)
    third = job_row(engine, schema, job.id)
    assert (third["attempts"], third["max_attempts"], third["last_error"]) == (3, 3, NODE_ERROR)
    assert_backed_off(third, due, started_at(engine, log, job.id, 3, "node"), db_now(engine))
    assert third["is_available"] is False
    # Neither side runs it again, even when due.
    make_due(engine, schema)
    await run_node_once(node, schema, log)
    await run_python_once(engine, schema, log)
    assert [r["who"] for r in log_rows(engine, log)] == ["node", "python", "node"]
    with engine.connect() as connection:
        queue_lock = connection.execute(
            text(f"select locked_at, locked_by from {quote_schema(schema)}._private_job_queues")
        ).one()
    assert tuple(queue_lock) == (None, None)


async def test_permanent_failure_looks_the_same_from_both_sides(
    node: NodeProcess, engine: Engine, schema: str
) -> None:
    log = make_log(engine, schema)
    utils = WorkerUtils(engine, schema)
    failed = {}
    for who in ("node", "python"):
        job = utils.add_raw_job(
            "flaky", {"once": True}, JobSpec(queue_name="pq", max_attempts=1, priority=3)
        )
        if who == "node":
            await run_node_once(node, schema, log)
        else:
            await run_python_once(engine, schema, log)
        row = job_row(engine, schema, job.id)
        assert_backed_off(row, job.run_at, started_at(engine, log, job.id, 1, who), db_now(engine))
        failed[who] = row

    def comparable(row: dict[str, Any]) -> dict[str, Any]:
        skip = {"id", "run_at", "created_at", "updated_at", "last_error"}
        return {
            **{k: v for k, v in row.items() if k not in skip},
            "untouched_updated_at": row["updated_at"] == row["created_at"],
        }

    assert comparable(failed["node"]) == comparable(failed["python"])
    shared = comparable(failed["node"])
    assert (shared["attempts"], shared["max_attempts"], shared["is_available"]) == (1, 1, False)
    assert (shared["locked_at"], shared["locked_by"], shared["untouched_updated_at"]) == (
        None,
        None,
        True,
    )
    assert failed["node"]["last_error"] == NODE_ERROR
    assert failed["python"]["last_error"].startswith(f"RuntimeError: {PYTHON_ERROR}")
    # Both are "failed" to our utils, and neither side runs them again.
    listed = {j.id for j in utils.list_jobs("failed")}
    assert listed == {failed["node"]["id"], failed["python"]["id"]}
    make_due(engine, schema)
    await run_node_once(node, schema, log)
    await run_python_once(engine, schema, log)
    assert [r["who"] for r in log_rows(engine, log)] == ["node", "python"]
