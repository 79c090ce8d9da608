"""Python and Node workers share named queues and never run two of a queue's jobs at once."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from interop_fixtures import NodeProcess, log_rows, make_log, recording_task
from sqlalchemy import Engine
from worker_fixtures import await_for, rows, running

from sqla_graphile import JobSpec, RawJobSpec, Worker, WorkerUtils

pytestmark = pytest.mark.node

QUEUES = ("q0", "q1", "q2", None)
JOBS = 200


async def test_named_queues_shared_with_a_node_worker(
    node_dir: Path, database_url: str, engine: Engine, schema: str, tmp_path: Path
) -> None:
    log = make_log(engine, schema)
    jobs = WorkerUtils(engine, schema).add_raw_jobs(
        [
            RawJobSpec("timed", {"n": n}, JobSpec(queue_name=QUEUES[n % len(QUEUES)]))
            for n in range(JOBS)
        ]
    )
    node = NodeProcess(node_dir, database_url, tmp_path / "node.log")
    try:
        node.start_pool("shared", schema, {"timed": {"log": log, "sleepMs": 15}}, concurrency=4)
        # Node starts slower than we do: let it take its first job, then join it.
        await await_for(
            lambda: log_rows(engine, log, "who = 'node'"), timeout=60, what="Node's first job"
        )
        worker = Worker(
            engine,
            [recording_task("timed", log, sleep=0.015)],
            schema=schema,
            concurrency=4,
            poll_interval=0.05,
        )
        async with running(worker):
            await await_for(
                lambda: not rows(engine, schema), timeout=120, what="every job to complete"
            )
        await node.acall("stop", name="shared")
    finally:
        node.close()

    recorded = log_rows(engine, log)
    # Every job exactly once, each run finished.
    assert Counter(r["job_id"] for r in recorded) == Counter(j.id for j in jobs)
    assert all(r["ended"] is not None for r in recorded)
    assert {r["who"] for r in recorded} == {"node", "python"}, "both workers should take part"
    by_queue = {q: [r for r in recorded if r["queue_name"] == q] for q in QUEUES}
    assert [len(v) for v in by_queue.values()] == [JOBS // len(QUEUES)] * len(QUEUES)
    for queue in QUEUES[:-1]:
        spans = sorted((r["started"], r["ended"]) for r in by_queue[queue])
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"two jobs of {queue} overlapped"
    # Unqueued jobs did run side by side (so the check above is not vacuous).
    free = sorted((r["started"], r["ended"]) for r in by_queue[None])
    assert any(start < end for (_, end), (start, _) in itertools.pairwise(free))
