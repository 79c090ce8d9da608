"""Losing database connections mid-run: workers reconnect, LISTEN again, and lose nothing.

The PostgreSQL server is shared, so it is never restarted: the worker's own backends
(found by their ``application_name`` in this test database) are terminated with
``pg_terminate_backend`` instead, the LISTEN connection included. The attempt log is
written on connections of another ``application_name``, which stay up.
"""

from __future__ import annotations

import pytest
from reliability_fixtures import (
    app_url,
    backends,
    count,
    create_log,
    log_rows,
    rel_processes,
    terminate_backends,
)
from sqlalchemy import Engine, text
from worker_fixtures import execute, rows, wait_for

from sqla_graphile import JobSpec, RawJobSpec, WorkerUtils
from sqla_graphile.schema import quote_schema

# So long that only a notification (or a reconnection) can make an idle worker fetch.
NO_POLLING = 3600.0


def _config(database_url: str, schema: str, app: str, **extra: object) -> dict[str, object]:
    return {
        "url": app_url(database_url, app),
        "log_url": app_url(database_url, f"{app}_log"),
        "schema": schema,
        "concurrency": 8,
        "poll_interval": NO_POLLING,
        "log_level": "WARNING",
        **extra,
    }


def _listener_pids(engine: Engine, app: str) -> set[int]:
    return {b["pid"] for b in backends(engine, app) if b["query"].startswith("LISTEN")}


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_outcome_write_killed_in_flight_is_retried(
    engine: Engine, database_url: str, schema: str, outcome: str
) -> None:
    """The completion (or failure) statement's backend dies mid-statement: it is sent again."""
    create_log(engine, schema)
    app = f"rel_inflight_{schema}"
    utils = WorkerUtils(engine, schema)
    s = quote_schema(schema)
    # Outcomes wait 3 s in memory: time to take the job's row lock before they are sent.
    config = _config(database_url, schema, app, complete_batch_delay=3.0)
    with rel_processes([config]) as (proc,):
        wait_for(lambda: _listener_pids(engine, app), 60, what="worker listening")
        # Hold the job's row lock: the worker's write of the outcome blocks on it.
        blocker = engine.connect()
        try:
            job = utils.add_raw_job("rel_work", {"fail": outcome == "fail"})
            wait_for(
                lambda: log_rows(engine, schema, "finished is not null"), what="job attempt done"
            )
            locked = blocker.execute(
                text(f"select id from {s}._private_jobs where id = :id for update"), {"id": job.id}
            )
            assert locked.scalar_one() == job.id, "the outcome was written before the lock"

            def blocked_writer() -> list[int]:
                return [
                    b["pid"]
                    for b in execute(
                        engine,
                        "select pid from pg_stat_activity where datname = current_database() "
                        "and application_name = :app and wait_event_type = 'Lock'",
                        app=app,
                    )
                ]

            (pid,) = wait_for(blocked_writer, what="the outcome write blocked on the row lock")
            execute(engine, "select pg_terminate_backend(:pid)", pid=pid)
            wait_for(lambda: pid not in {b["pid"] for b in backends(engine, app)})
        finally:
            blocker.rollback()
            blocker.close()
        verb = "completing" if outcome == "complete" else "failing"
        wait_for(lambda: proc.saw(f"{verb} 1 job(s) failed (attempt 1"), what="the retry warning")
        if outcome == "complete":
            wait_for(lambda: rows(engine, schema) == [], what="the completion written")
        else:
            wait_for(
                lambda: [r["locked_by"] for r in rows(engine, schema)] == [None],
                what="the failure written",
            )
        assert proc.stop() == 0, proc.tail()
    log = log_rows(engine, schema)
    assert [(r["job_id"], r["attempt"]) for r in log] == [(job.id, 1)]
    if outcome == "fail":
        (row,) = rows(engine, schema)
        assert row["attempts"] == 1 and row["locked_at"] is None
        assert row["last_error"].startswith("InjectedFailure: injected failure")
        assert row["run_at"] > log[0]["finished"]
    assert not proc.saw("no longer held"), proc.tail()


def test_workers_reconnect_listen_again_and_finish_every_job(
    engine: Engine, database_url: str, schema: str
) -> None:
    create_log(engine, schema)
    app = f"rel_conn_{schema}"
    jobs_count = 3000
    utils = WorkerUtils(engine, schema)
    s = quote_schema(schema)
    configs = [
        _config(database_url, schema, app, complete_batch_delay=0.2, seed=k) for k in range(2)
    ]
    with rel_processes(configs) as procs:
        wait_for(lambda: len(_listener_pids(engine, app)) == 2, 60, what="workers listening")
        ids = [
            job.id
            for job in utils.add_raw_jobs(
                [
                    # "sleep" keeps jobs running while their backends are killed.
                    RawJobSpec(
                        "rel_work",
                        {"i": i, "sleep": 0.01},
                        JobSpec(queue_name=f"rel_c{i % 5}" if i % 3 == 0 else None),
                    )
                    for i in range(jobs_count)
                ]
            )
        ]
        killed: list[int] = []
        done = f"select count(*) from {s}.rel_log where finished is not null"
        for round_ in range(1, 7):
            # Kill whenever another slice of the work has been done, then again.
            wait_for(
                lambda r=round_: count(engine, done) >= r * jobs_count // 8,
                120,
                what=f"progress before kill round {round_}",
            )
            killed += terminate_backends(engine, app)
        assert killed, "no worker backend was terminated"
        live = f"select count(*) from {s}._private_jobs"
        wait_for(lambda: count(engine, live) == 0, 180, what="every job completed")

        # LISTEN again on new connections, then prove a notification wakes the workers.
        terminate_backends(engine, app)
        wait_for(
            lambda: len(_listener_pids(engine, app) - set(killed)) == 2,
            60,
            what="both workers listening again",
        )
        for proc in procs:
            assert proc.saw("LISTEN connection failed"), proc.tail()
        for _ in range(2):
            job = utils.add_raw_job("rel_work", {"after": True})
            ids.append(job.id)
            wait_for(
                lambda: count(engine, live) == 0,
                60,
                what="a job added after reconnection run (woken by NOTIFY, not polling)",
            )
        for proc in procs:
            assert proc.stop() == 0, proc.tail()

    log = log_rows(engine, schema)
    # Every job ran exactly once, to its end, successfully: none lost, none repeated.
    assert sorted(r["job_id"] for r in log) == sorted(ids)
    assert all(r["attempt"] == 1 and r["outcome"] == "ok" for r in log)
    assert (
        count(engine, f"select count(*) from {s}._private_job_queues where locked_by is not null")
        == 0
    )
    retried = sum(proc.count("failed (attempt") for proc in procs)
    assert retried > 0, "no statement was retried: the kills hit nothing"
