"""Mixed fleets, enqueueing: Python adds jobs a Node worker runs, and the reverse.

Every job is checked field by field on the receiving side: payload, run_at, priority,
queue name, flags, key, attempts. Node's task records ``helpers.job`` and
``helpers.getQueueName()``; ours records its ``ctx.job``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from interop_fixtures import NodeProcess, log_rows, make_log, recording_task
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from worker_fixtures import await_for, rows

from sqla_graphile import AsyncWorkerUtils, Job, JobSpec, RawJobSpec, Worker, WorkerUtils
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

MS = timedelta(milliseconds=1)


def js_time(value: str) -> datetime:
    """A JavaScript ``toISOString()`` (as JSON carries a JS Date)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def db_now(engine: Engine) -> datetime:
    with engine.connect() as connection:
        value: datetime = connection.scalar(text("select now()"))
        return value


def assert_node_received(job: Job, logged: dict[str, Any]) -> None:
    """What Node's task saw is the job as Python added it (dates to JS precision)."""
    seen = logged["job"]
    assert logged["who"] == "node"
    assert str(seen["id"]) == str(job.id)
    assert seen["task_identifier"] == job.task_identifier
    assert seen["payload"] == job.payload
    assert logged["queue_name"] == job.queue_name
    assert seen["job_queue_id"] == job.job_queue_id
    assert seen["priority"] == job.priority
    assert seen["max_attempts"] == job.max_attempts
    assert seen["key"] == job.key
    assert seen["revision"] == job.revision
    assert seen["attempts"] == 1
    flags = sorted(seen["flags"]) if seen["flags"] is not None else None
    assert flags == (sorted(job.flags) if job.flags is not None else None)
    assert all(value is True for value in (seen["flags"] or {}).values())
    # JS dates hold milliseconds; PostgreSQL microseconds.
    assert abs(js_time(seen["run_at"]) - job.run_at) < MS
    assert abs(js_time(seen["created_at"]) - job.created_at) < MS


async def test_python_enqueues_and_a_node_worker_runs_the_jobs(
    node: NodeProcess, engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    log = make_log(engine, schema)
    tasks = {name: {"log": log} for name in ("py_to_node", "py_to_node_b")}
    # A 60-second poll: within this test, Node finds jobs only when notified.
    await node.astart_pool("s1", schema, tasks, concurrency=3, poll_interval_ms=60_000)
    try:
        # 1. One job from a sync Session, after Node is listening: NOTIFY at commit.
        with Session(engine) as session, session.begin():
            first = WorkerUtils(session, schema).add_raw_job("py_to_node", {"n": 0})
            committed_at = session.scalar(text("select clock_timestamp()"))
        logged = await await_for(
            lambda: log_rows(engine, log, f"job_id = {first.id}"),
            timeout=30,
            what="Node to run the job (it polls only every 60 s)",
        )
        pickup = logged[0]["started"] - committed_at
        print(f"\nNode picked the job up {pickup.total_seconds() * 1000:.1f} ms after commit")
        assert_node_received(first, logged[0])

        # 2. Everything else a job can carry, from a sync Session and an AsyncSession.
        scheduled_at = (db_now(engine) + timedelta(seconds=3)).replace(microsecond=250_000)
        added: list[Job] = []
        with Session(engine) as session, session.begin():
            utils = WorkerUtils(session, schema)
            added.append(utils.add_raw_job("py_to_node", {"text": "héllo ✓", "n": [1, 2.5]}))
            added.append(
                utils.add_raw_job(
                    "py_to_node_b",
                    [{"item": 1}, {"item": 2}],
                    JobSpec(queue_name="py-q", priority=-4, max_attempts=7),
                )
            )
            utils.add_raw_job("py_to_node", {"v": 1}, JobSpec(job_key="the-key"))
            # Re-added in the same transaction: replaced (revision 1).
            added.append(
                utils.add_raw_job(
                    "py_to_node", {"v": 2}, JobSpec(job_key="the-key", flags=["red", "blue"])
                )
            )
            added.append(
                utils.add_raw_job("py_to_node", {"when": "later"}, JobSpec(run_at=scheduled_at))
            )
            added += utils.add_raw_jobs(
                [
                    RawJobSpec("py_to_node", {"batch": n}, JobSpec(queue_name=f"bq{n % 2}"))
                    for n in range(4)
                ]
                + [RawJobSpec("py_to_node_b", None, JobSpec(flags=["solo"], priority=2))]
            )
        async with AsyncSession(async_engine) as session, session.begin():
            async_utils = AsyncWorkerUtils(session, schema)
            added.append(
                await async_utils.add_raw_job(
                    "py_to_node",
                    {"from": "AsyncSession", "null": None},
                    JobSpec(queue_name="async-q", flags=["a"], priority=1, job_key="ak"),
                )
            )
            added += await async_utils.add_raw_jobs(
                [RawJobSpec("py_to_node_b", {"async_batch": n}) for n in range(3)]
            )
        keyed = next(j for j in added if j.key == "the-key")
        assert keyed.revision == 1 and keyed.payload == {"v": 2}
        scheduled = next(j for j in added if j.payload == {"when": "later"})

        # The scheduled job is not notified when due: once due, another enqueue wakes Node.
        await await_for(lambda: db_now(engine) > scheduled_at, what="the scheduled time")
        added.append(WorkerUtils(engine, schema).add_raw_job("py_to_node", {"nudge": True}))

        ids = [j.id for j in added]
        await await_for(
            lambda: not rows(engine, schema, f"j.id in ({', '.join(map(str, ids))})"),
            timeout=30,
            what="Node to run and complete every job",
        )
    finally:
        await node.acall("stop", name="s1")

    logged_by_id: dict[int, list[dict[str, Any]]] = {}
    for row in log_rows(engine, log):
        logged_by_id.setdefault(row["job_id"], []).append(row)
    assert sorted(logged_by_id) == sorted([first.id, *ids]), "every job ran, no other"
    for job in added:
        runs = logged_by_id[job.id]
        assert len(runs) == 1, f"job {job.id} ran {len(runs)} times"
        assert_node_received(job, runs[0])
    assert logged_by_id[scheduled.id][0]["started"] >= scheduled_at
    assert logged_by_id[keyed.id][0]["job"]["flags"] == {"red": True, "blue": True}


async def test_node_enqueues_and_our_worker_runs_the_jobs(
    node: NodeProcess, engine: Engine, schema: str
) -> None:
    log = make_log(engine, schema)
    run_at = (db_now(engine) - timedelta(minutes=5)).replace(microsecond=125_000)
    single = await node.acall(
        "addJob",
        schema=schema,
        identifier="node_to_py",
        payload={"from": "addJob", "nested": {"x": [1, None, "ü"]}},
        spec={
            "queueName": "node-q",
            "priority": 3,
            "maxAttempts": 4,
            "jobKey": "node-key",
            "flags": ["x", "y"],
            "runAt": run_at.isoformat(),
        },
    )
    batch = await node.acall(
        "addJobs",
        schema=schema,
        specs=[
            {"identifier": "node_to_py", "payload": {"from": "addJobs", "n": n}}
            | ({"queueName": "node-q2", "priority": -1} if n % 2 else {"flags": ["z"]})
            | ({"jobKey": f"batch-{n}"} if n == 3 else {})
            for n in range(5)
        ],
    )
    q = quote_schema(schema)
    via_sql = await node.acall(
        "query",
        schema=schema,
        sql=(
            f"select * from {q}.add_job('node_to_py_sql', $1::json, queue_name => 'sql-q',"
            " priority => -2, max_attempts => 9, job_key => 'sql-key',"
            " flags => array['f1', 'f2'])"
        ),
        values=[json.dumps({"from": "SQL add_job"})],
    )
    node_ids = sorted(int(r["id"]) for r in [single, *batch, *via_sql])
    stored = {row["id"]: row for row in rows(engine, schema)}
    assert sorted(stored) == node_ids
    queue_names = {None: None}
    with engine.connect() as connection:
        for queue_id, name in connection.execute(
            text(f"select id, queue_name from {q}._private_job_queues")
        ):
            queue_names[queue_id] = name
    assert stored[int(single["id"])]["run_at"] == run_at

    worker = Worker(
        engine,
        [recording_task("node_to_py", log), recording_task("node_to_py_sql", log)],
        schema=schema,
        concurrency=4,
    )
    await worker.run_once_async()

    assert rows(engine, schema) == [], "every job completed"
    received = {row["job_id"]: row for row in log_rows(engine, log)}
    assert sorted(received) == node_ids
    assert len(log_rows(engine, log)) == len(node_ids), "each job ran once"
    for job_id, row in stored.items():
        seen = received[job_id]["job"]
        assert received[job_id]["who"] == "python"
        assert seen["payload"] == row["payload"]
        assert seen["task_identifier"] == row["task_identifier"]
        assert seen["queue_name"] == queue_names[row["job_queue_id"]]
        assert seen["priority"] == row["priority"]
        assert seen["max_attempts"] == row["max_attempts"]
        assert seen["key"] == row["key"]
        assert seen["flags"] == (sorted(row["flags"]) if row["flags"] is not None else None)
        assert datetime.fromisoformat(seen["run_at"]) == row["run_at"]
        assert seen["attempts"] == 1
    # What Node asked for, as our worker saw it.
    by_payload = {
        json.dumps(r["job"]["payload"], sort_keys=True): r["job"] for r in received.values()
    }
    first = by_payload[json.dumps(single["payload"], sort_keys=True)]
    assert (first["queue_name"], first["priority"], first["max_attempts"]) == ("node-q", 3, 4)
    assert (first["key"], first["flags"]) == ("node-key", ["x", "y"])
    assert datetime.fromisoformat(first["run_at"]) == run_at
    sql_job = by_payload[json.dumps({"from": "SQL add_job"})]
    assert (sql_job["queue_name"], sql_job["priority"], sql_job["key"]) == ("sql-q", -2, "sql-key")
    assert (sql_job["max_attempts"], sql_job["flags"]) == (9, ["f1", "f2"])
    for n in range(5):
        seen = by_payload[json.dumps({"from": "addJobs", "n": n}, sort_keys=True)]
        if n % 2:
            assert (seen["queue_name"], seen["priority"], seen["flags"]) == ("node-q2", -1, None)
        else:
            assert (seen["queue_name"], seen["priority"], seen["flags"]) == (None, 0, ["z"])
        assert seen["key"] == (f"batch-{n}" if n == 3 else None)
