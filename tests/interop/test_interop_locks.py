"""Mixed fleets, locks: a dead Node worker's jobs, a live Node worker's long job.

A Node pool locks its jobs with its pool id. When the process dies (SIGKILL, mid-job),
``force_unlock_workers`` with that id releases them and our worker runs them. Our
recovery sweep judges unregistered holders (Node) only by Node's 4-hour rule, so a live
Node worker's long job is never taken from it, however short the sweep threshold.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from interop_fixtures import NodeProcess, log_rows, make_log, recording_task
from sqlalchemy import Engine, text
from worker_fixtures import await_for, rows

from sqla_graphile import JobSpec, SweepStaleWorkersOptions, Worker, WorkerUtils
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

LONG = {"sleepMs": 600_000}


def queue_locks(engine: Engine, schema: str) -> dict[str, str | None]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text(
                    f"select queue_name, locked_by from {quote_schema(schema)}._private_job_queues"
                )
            ).all()
        )


async def test_force_unlock_releases_a_killed_node_pools_jobs(
    node_dir: Path, database_url: str, engine: Engine, schema: str, tmp_path: Path
) -> None:
    log = make_log(engine, schema)
    utils = WorkerUtils(engine, schema)
    jobs = [
        utils.add_raw_job("long", {"n": 1}, JobSpec(queue_name="lq")),
        utils.add_raw_job("long", {"n": 2}),
    ]
    node = NodeProcess(node_dir, database_url, tmp_path / "node.log")
    try:
        pool_id = node.start_pool("doomed", schema, {"long": {"log": log, **LONG}}, concurrency=2)
        await await_for(lambda: len(log_rows(engine, log)) == 2, what="Node to start both jobs")
        node.kill()
    finally:
        node.close()

    assert pool_id.startswith("pool-")
    held = rows(engine, schema)
    assert [r["locked_by"] for r in held] == [pool_id, pool_id]
    assert queue_locks(engine, schema) == {"lq": pool_id}

    # Node's rule: a fresh lock of an unregistered holder is not ours to take.
    sweep = utils.sweep_stale_workers(
        SweepStaleWorkersOptions(sweep_threshold=timedelta(milliseconds=1))
    )
    assert (sweep.job_ids, sweep.worker_ids) == ([], [])
    assert [r["locked_by"] for r in rows(engine, schema)] == [pool_id, pool_id]

    utils.force_unlock_workers([pool_id])
    released = rows(engine, schema)
    assert [(r["locked_at"], r["locked_by"]) for r in released] == [(None, None)] * 2
    # Only the locks change: the attempt stays used, run_at and last_error as they were.
    for before, after in zip(held, released, strict=True):
        assert (after["attempts"], after["run_at"], after["last_error"]) == (
            before["attempts"],
            before["run_at"],
            before["last_error"],
        )
        assert after["attempts"] == 1
    assert queue_locks(engine, schema) == {"lq": None}

    await Worker(engine, [recording_task("long", log)], schema=schema).run_once_async()
    assert rows(engine, schema) == []
    python_runs = log_rows(engine, log, "who = 'python'")
    assert sorted(r["job_id"] for r in python_runs) == sorted(j.id for j in jobs)
    assert all(r["attempt"] == 2 for r in python_runs)


async def test_our_sweep_never_unlocks_a_live_node_workers_long_job(
    node_dir: Path, database_url: str, engine: Engine, schema: str, tmp_path: Path
) -> None:
    log = make_log(engine, schema)
    utils = WorkerUtils(engine, schema)
    long_job = utils.add_raw_job("long", {"long": True}, JobSpec(queue_name="live-q"))
    node = NodeProcess(node_dir, database_url, tmp_path / "node.log")
    try:
        pool_id = node.start_pool("alive", schema, {"long": {"log": log, **LONG}})
        await await_for(lambda: log_rows(engine, log), what="Node to start the long job")
        # The live lock is older than the sweep threshold (by the database clock).
        await await_for(
            lambda: rows(
                engine, schema, f"j.id = {long_job.id} and j.locked_at < now() - interval '2 s'"
            ),
            what="the live lock to age",
        )
        # A holder that vanished 5 hours ago: the sweep does recover that one. Set just
        # before the sweep: Node's own 4-hour sweep (first at a random 0-60 s after its
        # start) would otherwise race ours for it.
        gone = utils.add_raw_job("other", {"gone": True})
        q = quote_schema(schema)
        with engine.begin() as connection:
            connection.execute(
                text(
                    f"update {q}._private_jobs set locked_at = now() - interval '5 hours',"
                    " locked_by = 'pool-gone5hoursago', attempts = 1 where id = :id"
                ),
                {"id": gone.id},
            )
        (before,) = rows(engine, schema, f"j.id = {long_job.id}")

        sweep = utils.sweep_stale_workers(
            SweepStaleWorkersOptions(sweep_threshold=timedelta(seconds=1))
        )
        assert sweep.job_ids == [gone.id]
        assert sweep.worker_ids == ["pool-gone5hoursago"]
        assert sweep.queue_names == []
        (after,) = rows(engine, schema, f"j.id = {long_job.id}")
        assert after == before
        assert after["locked_by"] == pool_id
        assert queue_locks(engine, schema) == {"live-q": pool_id}

        # Our worker, with its own run-once sweep, runs the recovered job, not Node's.
        worker = Worker(
            engine, [recording_task("long", log), recording_task("other", log)], schema=schema
        )
        await worker.run_once_async()
        assert [r["job_id"] for r in log_rows(engine, log, "who = 'python'")] == [gone.id]
        assert [r["job_id"] for r in log_rows(engine, log)] == [long_job.id, gone.id]
        (still,) = rows(engine, schema)
        assert (still["id"], still["locked_by"]) == (long_job.id, pool_id)
        assert log_rows(engine, log, "who = 'node' and ended is null"), "Node is still at it"
    finally:
        node.kill()
        node.close()
