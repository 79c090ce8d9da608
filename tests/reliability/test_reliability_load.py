"""Load: several worker processes, named queues, random failures; nothing lost, nothing doubled.

Every attempt is logged by the database clock (``reliability_process.py``); the checks
are SQL over that log and the jobs table. Failures keep the real backoff (e^1 then e^2
seconds): with ``max_attempts`` 3 a job is finished or permanently failed at most ~10 s
after its first attempt, so the backoff adds seconds, not minutes, to a run.

Sizes: the default suite runs 2,000 jobs on 2 processes × concurrency 4; the slow one
runs ``RELIABILITY_LOAD_JOBS`` jobs (default 20,000, sized for CI on a 2-core machine)
on 4 processes × concurrency 8 across 50 named queues. ``RELIABILITY_LOAD_JOBS=100000``
runs the full-size scenario.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
from reliability_fixtures import app_url, backends, count, create_log, rel_processes
from sqlalchemy import Engine
from worker_fixtures import execute, wait_for

from sqla_graphile import JobSpec, RawJobSpec, WorkerUtils
from sqla_graphile.schema import quote_schema

MAX_ATTEMPTS = 3


@dataclass
class LoadFigures:
    jobs: int
    attempts: int
    failures: int
    permanently_failed: int
    seconds: float
    workers: int


def run_load(
    engine: Engine,
    database_url: str,
    schema: str,
    *,
    jobs: int,
    processes: int,
    concurrency: int,
    queues: int,
    fail_rate: float,
    always_failing: int,
) -> LoadFigures:
    create_log(engine, schema)
    app = f"rel_load_{schema}"
    configs = [
        {
            "url": app_url(database_url, f"{app}_{k}"),
            "log_url": app_url(database_url, f"{app}_log"),
            "schema": schema,
            "concurrency": concurrency,
            "poll_interval": 0.5,
            "fail_rate": fail_rate,
            "seed": k,
            "log_level": "ERROR",
        }
        for k in range(processes)
    ]
    utils = WorkerUtils(engine, schema)
    started = time.monotonic()
    with rel_processes(configs) as procs:
        # Every process listens before the first job exists, so all of them take part.
        for k in range(processes):
            wait_for(
                lambda k=k: any(
                    b["query"].startswith("LISTEN") for b in backends(engine, f"{app}_{k}")
                ),
                60,
                what=f"worker {k} listening",
            )
        ids: list[int] = []
        chunk: list[RawJobSpec] = []
        for i in range(jobs):
            # Half the jobs without a queue, half spread over the named queues.
            queue = None if i % 2 == 0 else f"rel_q{(i // 2) % queues}"
            payload: dict[str, Any] = {"i": i}
            if i < always_failing:
                payload["fail"] = True
            chunk.append(
                RawJobSpec(
                    "rel_work", payload, JobSpec(queue_name=queue, max_attempts=MAX_ATTEMPTS)
                )
            )
            if len(chunk) == 5000 or i == jobs - 1:
                ids.extend(job.id for job in utils.add_raw_jobs(chunk))
                chunk = []
        assert len(set(ids)) == jobs

        live = (
            f"select count(*) from {quote_schema(schema)}._private_jobs "
            "where attempts < max_attempts or locked_at is not null"
        )
        wait_for(
            lambda: count(engine, live) == 0,
            timeout=120 + jobs / 50,
            what="every job finished or permanently failed",
        )
        for proc in procs:
            assert proc.stop() == 0, proc.tail()
            assert proc.saw("EXITED"), proc.tail()
            assert not proc.saw("LOGERROR"), proc.tail()
        seconds = time.monotonic() - started
    return check_load(engine, schema, ids, seconds, always_failing)


def check_load(
    engine: Engine, schema: str, ids: list[int], seconds: float, always_failing: int
) -> LoadFigures:
    s = quote_schema(schema)
    log = f"{s}.rel_log"
    # Every job ran, and nothing else did.
    logged = {r["job_id"] for r in execute(engine, f"select distinct job_id from {log}")}
    assert logged == set(ids)
    # Every attempt ran to its end (nothing was cut short).
    assert count(engine, f"select count(*) from {log} where finished is null") == 0
    # Attempt numbers are 1..n, each once, and never beyond max_attempts.
    bad_numbering = execute(
        engine,
        f"select job_id from {log} group by job_id having min(attempt) <> 1 "
        f"or max(attempt) <> count(*) or count(distinct attempt) <> count(*) "
        f"or max(attempt) > {MAX_ATTEMPTS}",
    )
    assert bad_numbering == []
    # Each attempt but the last failed; the last succeeded, or was the final failure.
    bad_outcomes = execute(
        engine,
        f"select job_id, attempt, outcome from (select job_id, attempt, outcome, "
        f"max(attempt) over (partition by job_id) as last from {log}) a "
        f"where (attempt < last and outcome <> 'fail') "
        f"or (attempt = last and outcome = 'fail' and attempt < {MAX_ATTEMPTS})",
    )
    assert bad_outcomes == []
    # No two attempts of one job overlap, and no two attempts in one named queue do.
    for partition, where in (("job_id", "true"), ("queue_name", "queue_name is not null")):
        overlaps = execute(
            engine,
            f"select * from (select id, {partition}, started, max(finished) over "
            f"(partition by {partition} order by started, id rows between unbounded "
            f"preceding and 1 preceding) as previous_end from {log} where {where}) o "
            f"where started < previous_end",
        )
        assert overlaps == [], f"attempts overlapping within one {partition}: {overlaps[:5]}"
    # The jobs table ends with exactly the permanently failed jobs, unlocked.
    permafailed = {
        r["job_id"]
        for r in execute(
            engine,
            f"select job_id from {log} where attempt = {MAX_ATTEMPTS} and outcome = 'fail'",
        )
    }
    left = execute(
        engine, f"select id, attempts, max_attempts, locked_by, last_error from {s}._private_jobs"
    )
    assert {r["id"] for r in left} == permafailed
    assert set(ids[:always_failing]) <= permafailed
    for row in left:
        assert row["attempts"] == row["max_attempts"] == MAX_ATTEMPTS
        assert row["locked_by"] is None
        assert row["last_error"].startswith("InjectedFailure: injected failure")
    assert (
        count(engine, f"select count(*) from {s}._private_job_queues where locked_by is not null")
        == 0
    )
    figures = execute(
        engine,
        f"select count(*) as attempts, count(*) filter (where outcome = 'fail') as failures, "
        f"count(distinct worker_id) as workers from {log}",
    )[0]
    return LoadFigures(
        jobs=len(ids),
        attempts=figures["attempts"],
        failures=figures["failures"],
        permanently_failed=len(permafailed),
        seconds=round(seconds, 1),
        workers=figures["workers"],
    )


def test_load_small_two_processes(engine: Engine, database_url: str, schema: str) -> None:
    figures = run_load(
        engine,
        database_url,
        schema,
        jobs=2000,
        processes=2,
        concurrency=4,
        queues=10,
        fail_rate=0.05,
        always_failing=3,
    )
    assert figures.workers == 2
    assert figures.failures > 0
    assert figures.permanently_failed >= 3


@pytest.mark.slow
def test_load_four_processes_fifty_queues(
    engine: Engine, database_url: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = int(os.environ.get("RELIABILITY_LOAD_JOBS", "20000"))
    figures = run_load(
        engine,
        database_url,
        schema,
        jobs=jobs,
        processes=4,
        concurrency=8,
        queues=50,
        fail_rate=0.02,
        always_failing=5,
    )
    assert figures.workers == 4
    assert figures.failures > 0
    with capsys.disabled():
        print(f"\nload figures: {figures}")
