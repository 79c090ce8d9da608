"""SIGKILL of a worker process: its jobs run again, after Node's 4 hours or a heartbeat threshold.

Two moments of death: while its jobs run, and after they ran while their completions
waited in memory for a batched write (``complete_batch_delay``). Either way the dead
worker's locks stay; what frees them is

* without recovery, Node's 4-hour rule (simulated by moving ``locked_at`` back 5 hours),
  applied by a run-once worker's sweep;
* with a heartbeat registry row (heartbeated here, then left to go stale),
  ``WorkerUtils.sweep_stale_workers`` after the threshold;
* with ``Worker(recovery=WorkerRecoveryConfig(enabled=True, ...))``, a surviving worker's
  own sweep.
"""

from __future__ import annotations

import inspect
import threading
from datetime import timedelta
from typing import Any

import pytest
from reliability_fixtures import app_url, create_log, log_rows, rel_processes
from sqlalchemy import Engine
from worker_fixtures import execute, rows, wait_for

from sqla_graphile import JobSpec, SweepStaleWorkersOptions, Worker, WorkerUtils
from sqla_graphile.recovery import RECOVERED_ERROR
from sqla_graphile.schema import quote_schema

QUEUE = "rel_crash_q"


def _config(database_url: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": database_url,
        "schema": schema,
        "concurrency": 4,
        "poll_interval": 0.2,
        "announce": True,
        "log_level": "WARNING",
        **extra,
    }


def _add_jobs(utils: WorkerUtils, during: str) -> list[int]:
    # Three jobs without a queue and two in one named queue: the second of those waits
    # behind the first, whose queue lock dies with the worker.
    payload = {"sleep": 3600, "sleep_once": True} if during == "jobs" else {}
    specs = [None, None, None, QUEUE, QUEUE]
    return [
        # The job left waiting in the queue is quick: only the crashed ones sleep.
        utils.add_raw_job(
            "rel_work", {**(payload if n < 4 else {}), "n": n}, JobSpec(queue_name=queue)
        ).id
        for n, queue in enumerate(specs)
    ]


def _crash(
    engine: Engine, database_url: str, schema: str, during: str, **extra: Any
) -> tuple[str, list[int], list[int]]:
    """Start a worker, let it take four jobs, SIGKILL it; its id, all jobs, affected jobs."""
    utils = WorkerUtils(engine, schema)
    ids = _add_jobs(utils, during)
    config = _config(
        database_url, schema, complete_batch_delay=3600.0 if during == "completion" else 0.0
    )
    config.update(extra)
    with rel_processes([config]) as (proc,):
        proc.wait_line("WORKER ")
        worker_id = next(line for line in proc.lines if line.startswith("WORKER ")).split()[1]
        affected = ids[:4]
        marker = "STARTED" if during == "jobs" else "FINISHED"
        for job_id in affected:
            proc.wait_line(f"{marker} {job_id} 1")
        proc.kill()
    assert proc.process.returncode == -9
    left = {r["id"]: r for r in rows(engine, schema)}
    assert sorted(left) == ids  # nothing completed: the completions died in memory
    for job_id in affected:
        assert left[job_id]["locked_by"] == worker_id
        assert left[job_id]["attempts"] == 1
    assert left[ids[4]]["locked_by"] is None and left[ids[4]]["attempts"] == 0
    queue = execute(
        engine,
        f"select locked_by from {quote_schema(schema)}._private_job_queues where queue_name = :q",
        q=QUEUE,
    )
    assert [q["locked_by"] for q in queue] == [worker_id]
    return worker_id, ids, affected


def _run_once(database_url: str, schema: str) -> None:
    with rel_processes([_config(database_url, schema, once=True)]) as (proc,):
        try:
            wait_for(lambda: proc.process.poll() is not None, 120, what="run-once exit")
        except AssertionError:
            raise AssertionError(proc.tail()) from None
        assert proc.process.returncode == 0, proc.tail()
        proc._reader.join(5)
        assert proc.saw("EXITED"), proc.tail()


def _assert_ran_again(engine: Engine, schema: str, ids: list[int], affected: list[int]) -> None:
    assert rows(engine, schema) == []
    log = log_rows(engine, schema)
    runs: dict[int, list[Any]] = {}
    for row in log:
        runs.setdefault(row["job_id"], []).append(row)
    assert sorted(runs) == ids
    for job_id in affected:
        # The crashed run, then one run to completion.
        assert len(runs[job_id]) == 2, runs[job_id]
        assert runs[job_id][-1]["outcome"] == "ok"
        assert runs[job_id][-1]["started"] >= (
            runs[job_id][0]["finished"] or runs[job_id][0]["started"]
        )
    assert [len(runs[j]) for j in ids if j not in affected] == [1]


@pytest.mark.parametrize("during", ["jobs", "completion"])
def test_crash_without_recovery_waits_for_the_four_hour_rule(
    engine: Engine, database_url: str, schema: str, during: str
) -> None:
    create_log(engine, schema)
    _worker_id, ids, affected = _crash(engine, database_url, schema, during)
    s = quote_schema(schema)

    # A run-once worker sweeps first: locks younger than 4 hours are left alone.
    _run_once(database_url, schema)
    still = {r["id"]: r["locked_by"] for r in rows(engine, schema)}
    assert sorted(still) == ids and all(still[j] is not None for j in affected)

    # Five hours later (simulated), the sweep unlocks them and they run again.
    for table in ("_private_jobs", "_private_job_queues"):
        execute(
            engine,
            f"update {s}.{table} set locked_at = locked_at - interval '5 hours' "
            "where locked_at is not null",
        )
    _run_once(database_url, schema)
    _assert_ran_again(engine, schema, ids, affected)
    # Node's rule keeps the crashed attempt counted.
    second_runs = log_rows(engine, schema, f"job_id in ({','.join(map(str, affected))})")
    assert sorted(r["attempt"] for r in second_runs) == [1] * 4 + [2] * 4


class _Heartbeat:
    """Keeps a registry row fresh from a thread, as a live worker would, until stopped."""

    def __init__(self, engine: Engine, schema: str, worker_id: str) -> None:
        self.table = f"{quote_schema(schema)}._sqla_graphile_workers"
        self.engine = engine
        self.worker_id = worker_id
        self.stopped = threading.Event()
        execute(engine, f"insert into {self.table} (worker_id) values (:w)", w=worker_id)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.wait(0.2):
            execute(
                self.engine,
                f"update {self.table} set last_heartbeat_at = now() where worker_id = :w",
                w=self.worker_id,
            )

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)


@pytest.mark.parametrize("during", ["jobs", "completion"])
def test_crash_with_a_registered_worker_recovered_by_the_sweep(
    engine: Engine, database_url: str, schema: str, during: str
) -> None:
    create_log(engine, schema)
    worker_id = f"rel_registered_{schema}"
    heartbeat = _Heartbeat(engine, schema, worker_id)
    try:
        _, ids, affected = _crash(engine, database_url, schema, during, worker_id=worker_id)
    finally:
        heartbeat.stop()
    utils = WorkerUtils(engine, schema)
    options = SweepStaleWorkersOptions(
        sweep_threshold=timedelta(seconds=2), recovery_delay=timedelta(0)
    )
    # Not stale yet: the sweep leaves the jobs locked.
    first = utils.sweep_stale_workers(options)
    assert first.job_ids == [] and first.worker_ids == []
    result = wait_for(
        lambda: utils.sweep_stale_workers(options).job_ids, 30, what="the stale worker swept"
    )
    assert result == affected
    for row in rows(engine, schema):
        assert row["locked_by"] is None
        if row["id"] in affected:
            # The interrupted attempt still counts, and the interruption is noted.
            assert row["attempts"] == 1
            assert row["last_error"] == RECOVERED_ERROR.format(worker_id=worker_id)
    assert execute(
        engine,
        f"select locked_by from {quote_schema(schema)}._private_job_queues",
    ) == [{"locked_by": None}]
    _run_once(database_url, schema)
    _assert_ran_again(engine, schema, ids, affected)


@pytest.mark.skipif(
    "recovery" not in inspect.signature(Worker.__init__).parameters,
    reason="Worker(recovery=...) is not wired into the worker yet",
)
@pytest.mark.parametrize("during", ["jobs", "completion"])
def test_crash_with_worker_recovery_runs_the_jobs_again(
    engine: Engine, database_url: str, schema: str, during: str
) -> None:
    create_log(engine, schema)
    recovery = {"heartbeat": 0.3, "sweep": 0.5, "threshold": 2.0, "delay": 0.0}
    _, ids, affected = _crash(engine, database_url, schema, during, recovery=recovery)
    survivor = _config(app_url(database_url, f"rel_survivor_{schema}"), schema, recovery=recovery)
    with rel_processes([survivor]) as (proc,):
        wait_for(lambda: rows(engine, schema) == [], 120, what="the dead worker's jobs done")
        assert proc.stop() == 0, proc.tail()
    _assert_ran_again(engine, schema, ids, affected)
