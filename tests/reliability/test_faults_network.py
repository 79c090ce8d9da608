"""Network faults between a worker and PostgreSQL: lost replies, half-open links, partitions.

Every worker here talks to the database through :class:`netproxy.PgProxy`; the test
itself (adding jobs, reading rows, recording handler runs) uses the direct engine, which
no fault touches. Waits are bounded polls that only turn a hang into a failure; the one
duration asserted is the documented shutdown bound, as a time limit on the shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest
from netproxy import PgProxy
from sqlalchemy import Engine
from worker_fixtures import await_for, execute, rows, running

from sqla_graphile import (
    FunctionTask,
    JobSpec,
    Worker,
    WorkerContext,
    WorkerRecoveryConfig,
    WorkerUtils,
    task,
)
from sqla_graphile.hooks import (
    Hooks,
    JobEvent,
    JobLockLostEvent,
    JobsFetchedEvent,
    WorkerFenceEvent,
    WorkerRecoveredEvent,
)
from sqla_graphile.schema import quote_schema

#: Small limits, so that the faults play out in seconds.
STATEMENT_TIMEOUT = 1.0
POLL_INTERVAL = 0.2
GRACE = 1.0
#: The spec's bound on a graceful shutdown, whatever the network does.
SHUTDOWN_BOUND = GRACE + 3 * STATEMENT_TIMEOUT + 1
#: Added to the bound so only a hang (not a slow machine) fails the shutdown.
SLACK = 10.0
#: Long enough for a fault to be handled on a loaded machine; only a hang exceeds it.
WAIT = 20.0

RECOVERY = WorkerRecoveryConfig(
    enabled=True,
    heartbeat_interval=timedelta(seconds=0.3),
    sweep_interval=timedelta(seconds=0.5),
    sweep_threshold=timedelta(seconds=2),
    # The lease's margin is heartbeat_interval + recovery_delay: room for a loaded machine.
    recovery_delay=timedelta(seconds=0.5),
)
#: How long a partition lasts: longer than the sweep threshold.
PARTITION = 4.0
#: How long a long job runs unless cancelled (longer than any scenario below).
LONG_JOB = 8.0


def fetch_mark(schema: str) -> bytes:
    """Bytes only the worker's fetch sends: it is the one statement counting an attempt."""
    return f"{schema}._private_jobs.attempts +".encode()


def complete_mark(schema: str) -> bytes:
    """Bytes only the worker's completion sends (it deletes job rows)."""
    return f"DELETE FROM {schema}._private_jobs".encode()


def proxied_worker(url: str, handler: Any, schema: str, **options: Any) -> Worker:
    """A worker of one task on ``url``, with the timings these scenarios assume."""
    return Worker(
        url,
        [handler],
        schema=schema,
        poll_interval=POLL_INTERVAL,
        shutdown_grace_period=GRACE,
        **options,
    )


def recording_task(identifier: str, runs: list[int]) -> FunctionTask[Any]:
    @task(identifier)
    async def record(payload: Any, ctx: WorkerContext) -> None:
        runs.append(ctx.job.id)

    return record


def locked_by(engine: Engine, schema: str, worker_id: str) -> list[str]:
    """What ``worker_id`` still holds: ``job <id>`` and ``queue <name>`` entries."""
    s = quote_schema(schema)
    jobs = execute(engine, f"select id from {s}._private_jobs where locked_by = :w", w=worker_id)
    queues = execute(
        engine, f"select queue_name from {s}._private_job_queues where locked_by = :w", w=worker_id
    )
    return [f"job {r['id']}" for r in jobs] + [f"queue {r['queue_name']}" for r in queues]


# -- lost replies -----------------------------------------------------------------------


async def test_lost_fetch_reply_strands_no_job(
    engine: Engine, schema: str, utils: WorkerUtils, pg_proxy: PgProxy
) -> None:
    """The reply of a fetch that locked jobs is lost: those jobs still run, each once.

    The server committed the fetch (jobs and queue locked under the worker's id, attempts
    counted), but the worker never saw the rows; it must give them back itself (attempt
    refunded) rather than leave them to the 4-hour rule. After a graceful shutdown it
    holds nothing.
    """
    runs: list[int] = []
    attempts: dict[int, int] = {}
    hooks = Hooks()

    @hooks.on("job_start")
    def started_job(event: JobEvent) -> None:
        attempts[event.job.id] = event.job.attempts

    jobs = [
        utils.add_raw_job("net_fetch", {"n": 1}),
        utils.add_raw_job("net_fetch", {"n": 2}),
        utils.add_raw_job("net_fetch", {"n": 3}, JobSpec(queue_name="net_fetch_q")),
    ]
    expected = sorted(job.id for job in jobs)
    pg_proxy.swallow_replies(fetch_mark(schema))
    worker = proxied_worker(
        pg_proxy.url,
        recording_task("net_fetch", runs),
        schema,
        hooks=hooks,
    )
    async with running(worker):
        await await_for(lambda: pg_proxy.swallowed == 1, WAIT, what="the fetch reply swallowed")
        await await_for(lambda: sorted(set(runs)) == expected, WAIT, what="every job run")
        await await_for(lambda: not rows(engine, schema), WAIT, what="every completion written")

    assert Counter(runs) == Counter(expected), "a job ran more than once"
    # The attempt the lost fetch counted was given back: each run is the job's first.
    assert attempts == {job_id: 1 for job_id in expected}
    assert locked_by(engine, schema, worker.worker_id) == []


async def test_lost_completion_reply_retried_is_not_a_lost_lock(
    engine: Engine, schema: str, utils: WorkerUtils, pg_proxy: PgProxy
) -> None:
    """A completion written but whose reply was lost is retried without ``job_lock_lost``.

    The retry finds the row already gone because the first attempt committed: that is
    not somebody else taking the job, and the job is not run again.
    """
    runs: list[int] = []
    lost: list[JobLockLostEvent] = []
    hooks = Hooks()
    hooks.on("job_lock_lost")(lost.append)
    job = utils.add_raw_job("net_complete", {})
    pg_proxy.swallow_replies(complete_mark(schema))
    worker = proxied_worker(
        pg_proxy.url,
        recording_task("net_complete", runs),
        schema,
        hooks=hooks,
    )
    async with running(worker):
        await await_for(lambda: runs, WAIT, what="the job run")
        await await_for(lambda: pg_proxy.swallowed == 1, WAIT, what="the completion's reply lost")
        await await_for(lambda: not rows(engine, schema), WAIT, what="the completion written")
    # The graceful shutdown waited for every outcome write, the retry included.

    assert lost == []
    assert runs == [job.id]
    assert locked_by(engine, schema, worker.worker_id) == []


# -- half-open links --------------------------------------------------------------------


async def _half_open_scenario(
    engine: Engine,
    schema: str,
    utils: WorkerUtils,
    proxy: PgProxy,
    job_wait: float,
    shutdown_bound: float,
    **options: Any,
) -> None:
    """An idle worker's links all go silent; a new job still runs; shutdown is bounded."""
    runs: list[int] = []
    worker = proxied_worker(
        proxy.url,
        recording_task("net_half_open", runs),
        schema,
        **options,
    )
    async with running(worker) as worker_task:
        try:
            # A first job proves the worker connected (fetch, LISTEN, writes) and idle.
            warm_up = utils.add_raw_job("net_half_open", {"warm_up": True})
            await await_for(lambda: runs == [warm_up.id], WAIT, what="the warm-up job")
            await await_for(lambda: not rows(engine, schema), WAIT, what="warm-up completed")
            assert proxy.freeze() > 0

            job = utils.add_raw_job("net_half_open", {})
            await await_for(
                lambda: job.id in runs, job_wait, what="a job run despite the silent links"
            )
            await await_for(lambda: not rows(engine, schema), job_wait, what="its completion")

            worker.request_shutdown()
            await asyncio.wait_for(asyncio.shield(worker_task), shutdown_bound + SLACK)
            assert worker_task.exception() is None
        finally:
            proxy.cut()  # lets a hung worker end, so the test fails instead of hanging
    assert runs == [warm_up.id, job.id]
    assert locked_by(engine, schema, worker.worker_id) == []


async def test_half_open_links_do_not_stop_jobs_or_the_shutdown(
    engine: Engine, schema: str, utils: WorkerUtils, pg_proxy: PgProxy
) -> None:
    """Every link of an idle worker goes silent without closing (half-open).

    ``statement_timeout`` abandons the silent connections and retries on new ones, so a
    job added afterwards runs, and a graceful shutdown ends within
    ``shutdown_grace_period + 3 * statement_timeout + 1`` seconds.
    """
    await _half_open_scenario(
        engine,
        schema,
        utils,
        pg_proxy,
        job_wait=WAIT,
        shutdown_bound=SHUTDOWN_BOUND,
        statement_timeout=STATEMENT_TIMEOUT,
    )


@pytest.mark.slow
async def test_half_open_links_with_the_default_statement_timeout(
    engine: Engine, schema: str, utils: WorkerUtils, pg_proxy: PgProxy
) -> None:
    """The same half-open links, with no option given: the default (30 s) limit applies.

    Slow by nature once it passes (a silent statement is abandoned after 30 s); it needs
    no new option, so it shows the hang on a worker without statement time limits.
    """
    default_timeout = 30.0
    await _half_open_scenario(
        engine,
        schema,
        utils,
        pg_proxy,
        job_wait=2 * default_timeout + WAIT,
        shutdown_bound=GRACE + 3 * default_timeout + 1,
    )


# -- partitions -------------------------------------------------------------------------


def create_run_log(engine: Engine, schema: str) -> None:
    execute(
        engine,
        f"create table {quote_schema(schema)}.net_runs (id bigserial primary key, "
        "job_id bigint not null, worker_id text not null, run text not null, "
        "event text not null, at timestamptz not null default clock_timestamp())",
    )


def long_task(engine: Engine, schema: str) -> FunctionTask[Any]:
    """A job that runs ``LONG_JOB`` seconds unless cancelled, logging its start and end.

    The log is written on the direct engine, synchronously, so a cancellation cannot
    skip the write of its ``cancelled`` end.
    """
    s = quote_schema(schema)

    def log(ctx: WorkerContext, run: str, event: str) -> None:
        execute(
            engine,
            f"insert into {s}.net_runs (job_id, worker_id, run, event) values (:j, :w, :r, :e)",
            j=ctx.job.id,
            w=ctx.worker_id,
            r=run,
            e=event,
        )

    @task("net_long")
    async def long_job(payload: Any, ctx: WorkerContext) -> None:
        run = secrets.token_hex(6)
        log(ctx, run, "start")
        try:
            await asyncio.sleep(LONG_JOB)
        except asyncio.CancelledError:
            log(ctx, run, "cancelled")
            raise
        log(ctx, run, "end")

    return long_job


def run_log(engine: Engine, schema: str) -> list[dict[str, Any]]:
    return execute(engine, f"select * from {quote_schema(schema)}.net_runs order by id")


def started(engine: Engine, schema: str) -> list[tuple[int, str]]:
    """``(job id, worker id)`` of every run started so far."""
    return [(r["job_id"], r["worker_id"]) for r in run_log(engine, schema) if r["event"] == "start"]


def overlapping_runs(log: list[dict[str, Any]]) -> list[str]:
    """Runs of one job whose start/end intervals overlap (a run never ended: open-ended)."""
    runs: dict[str, dict[str, Any]] = {}
    for row in log:
        run = runs.setdefault(row["run"], {"job": row["job_id"], "worker": row["worker_id"]})
        run[row["event"] if row["event"] == "start" else "end"] = row["at"]
    by_job: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for run in runs.values():
        by_job[run["job"]].append(run)
    found: list[str] = []
    for job_id, job_runs in by_job.items():
        job_runs.sort(key=lambda r: r["start"])
        for earlier, later in itertools.pairwise(job_runs):
            end: datetime | None = earlier.get("end")
            if end is None or later["start"] < end:
                found.append(
                    f"job {job_id}: run on {earlier['worker']} ({earlier['start']} to {end}) "
                    f"overlaps run on {later['worker']} from {later['start']}"
                )
    return found


def recovery_worker(url: str, schema: str, engine: Engine, hooks: Hooks) -> Worker:
    return proxied_worker(
        url,
        long_task(engine, schema),
        schema,
        concurrency=1,
        local_queue_size=0,  # a worker locks only the job it runs
        recovery=RECOVERY,
        hooks=hooks,
    )


def observing(recovered: list[WorkerRecoveredEvent]) -> Hooks:
    """Hooks collecting the ``worker_recovered`` events into ``recovered``."""
    hooks = Hooks()
    hooks.on("worker_recovered")(recovered.append)
    return hooks


def self_sweeps(recovered: list[WorkerRecoveredEvent]) -> list[WorkerRecoveredEvent]:
    return [event for event in recovered if event.worker_id in event.dead_worker_ids]


async def test_partition_longer_than_the_threshold_fences_both_workers(
    engine: Engine,
    schema: str,
    utils: WorkerUtils,
    pg_proxy: PgProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both workers lose the database for longer than the sweep threshold.

    Each fences itself (``worker_fence`` with ``fenced=True``, a warning saying
    "fenced") and cancels its job before anyone may judge it dead, then resumes after
    the partition heals; no job ever runs in two places at once, and no worker sweeps
    itself.
    """
    create_run_log(engine, schema)
    recoveries: list[WorkerRecoveredEvent] = []
    fences: list[Any] = []
    workers = []
    for _ in range(2):
        hooks = observing(recoveries)
        hooks.on("worker_fence")(fences.append)
        workers.append(recovery_worker(pg_proxy.url, schema, engine, hooks))
    first, second = workers
    jobs = [utils.add_raw_job("net_long", {"n": n}) for n in range(2)]

    with caplog.at_level(logging.WARNING, logger="sqla_graphile"):
        async with running(first), running(second):
            await await_for(
                lambda: (
                    {w for _, w in started(engine, schema)} == {first.worker_id, second.worker_id}
                ),
                WAIT,
                what="each worker running a job",
            )
            pg_proxy.partition()
            try:
                await asyncio.sleep(PARTITION)
            finally:
                pg_proxy.heal()
            await await_for(
                lambda: (
                    {e.worker_id for e in fences if not e.fenced}
                    == {first.worker_id, second.worker_id}
                ),
                WAIT,
                what="both workers resumed after the partition",
            )
            # Time for any sweep the healed workers make to recover and re-run jobs.
            await asyncio.sleep(4 * RECOVERY.sweep_interval.total_seconds())

    assert all(isinstance(e, WorkerFenceEvent) for e in fences)
    fenced: dict[str, set[int]] = defaultdict(set)
    for event in fences:
        if event.fenced:
            fenced[event.worker_id] |= set(event.job_ids)
    assert set(fenced) == {first.worker_id, second.worker_id}
    assert set().union(*fenced.values()) == {job.id for job in jobs}
    assert any(
        "fenced" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    ), "no warning says the worker fenced itself"
    assert overlapping_runs(run_log(engine, schema)) == []
    assert self_sweeps(recoveries) == []


#: Heartbeats far apart next to the lease (3 s), so one held up answers well inside it.
SPARSE_HEARTBEATS = WorkerRecoveryConfig(
    enabled=True,
    heartbeat_interval=timedelta(seconds=1),
    sweep_interval=timedelta(seconds=1),
    sweep_threshold=timedelta(seconds=4),
    recovery_delay=timedelta(seconds=0.5),
)


async def test_a_fetch_answered_while_fenced_leaves_no_job_stranded(
    engine: Engine, schema: str, utils: WorkerUtils, pg_proxy: PgProxy
) -> None:
    """A fence begins while a fetch is out; the fetch's answer arrives while still fenced.

    The jobs it locked are given up like the local queue and reclaimed when the fence
    lifts, so they run soon after (once), not when the local queue's TTL expires.
    """
    runs: list[int] = []
    fences: list[WorkerFenceEvent] = []
    fetched: list[JobsFetchedEvent] = []
    hooks = Hooks()
    hooks.on("worker_fence")(fences.append)
    hooks.on("jobs_fetched")(fetched.append)
    job = utils.add_raw_job("net_fenced_fetch", {})
    pg_proxy.hold_replies(fetch_mark(schema))
    worker = proxied_worker(
        pg_proxy.url,
        recording_task("net_fenced_fetch", runs),
        schema,
        concurrency=1,  # with the job in hand, no fetch follows until it ends
        recovery=SPARSE_HEARTBEATS,  # a loaded machine does not fence it by itself
        hooks=hooks,
    )
    async with running(worker):
        await await_for(lambda: pg_proxy.held_flows, WAIT, what="the fetch's reply held")
        pg_proxy.partition()  # the heartbeats stop too
        try:
            await await_for(lambda: fences, WAIT, what="the worker fenced")
            assert fences[0].fenced
            pg_proxy.release(pg_proxy.held_flows[0])  # the answer arrives, still fenced
            await await_for(lambda: fetched, WAIT, what="the held fetch answered")
            await asyncio.sleep(POLL_INTERVAL)  # the fetcher takes the jobs meanwhile
            assert len(fences) == 1, "the fence lifted before the fetch was answered"
        finally:
            pg_proxy.heal()
        await await_for(lambda: runs, WAIT, what="the job run after the fence lifted")
        await await_for(lambda: not rows(engine, schema), WAIT, what="its completion written")

    assert [fetched_job.id for fetched_job in fetched[0].jobs] == [job.id]
    assert runs == [job.id]
    # Answers held up by the partition did not lift the fence only for it to drop again.
    assert [event.fenced for event in fences] == [True, False]
    assert locked_by(engine, schema, worker.worker_id) == []


@pytest.mark.parametrize("answered", ["inside its lease", "after its lease"])
async def test_a_heartbeat_answered_late_does_not_lift_the_fence(
    schema: str, pg_proxy: PgProxy, answered: str
) -> None:
    """A heartbeat held up in the network is answered after the worker fenced itself.

    Sent before the fence began, it says nothing of now: lifted on it, the fence would
    drop again before the next heartbeat, cancelling whatever started in between. The
    fence lifts once, on a heartbeat sent after the network heals.
    """
    fences: list[WorkerFenceEvent] = []
    hooks = Hooks()
    hooks.on("worker_fence")(fences.append)
    worker = proxied_worker(
        pg_proxy.url,
        recording_task("net_late_heartbeat", []),
        schema,
        recovery=SPARSE_HEARTBEATS,
        hooks=hooks,
    )
    lease = (
        SPARSE_HEARTBEATS.sweep_threshold - SPARSE_HEARTBEATS.heartbeat_interval
    ).total_seconds()
    async with running(worker):
        pg_proxy.hold_replies(b"_sqla_graphile_workers")  # the registry: a heartbeat
        await await_for(lambda: pg_proxy.held_flows, WAIT, what="a heartbeat's reply held")
        held_at = time.monotonic()
        pg_proxy.partition()  # nothing else renews the lease
        try:
            await await_for(lambda: fences, WAIT, what="the worker fenced")
            if answered == "after its lease":
                await asyncio.sleep(max(0.0, held_at + lease + 0.3 - time.monotonic()))
            pg_proxy.release(pg_proxy.held_flows[0])  # that link stays cut off after
            await asyncio.sleep(2 * SPARSE_HEARTBEATS.heartbeat_interval.total_seconds())
            assert [event.fenced for event in fences] == [True], "the late answer lifted it"
        finally:
            pg_proxy.heal()
        await await_for(lambda: len(fences) > 1, WAIT, what="the fence lifted")
        await asyncio.sleep(SPARSE_HEARTBEATS.heartbeat_interval.total_seconds())

    assert [event.fenced for event in fences] == [True, False]


async def test_partitioned_worker_stops_its_job_before_a_peer_recovers_it(
    engine: Engine,
    database_url: str,
    schema: str,
    utils: WorkerUtils,
    pg_proxy: PgProxy,
) -> None:
    """Only one worker is cut off, longer than the sweep threshold; its peer is healthy.

    The peer sweeps the silent worker and runs its job again; the silent worker must
    have stopped that job first (fenced), so the job never runs in two places at once.
    """
    create_run_log(engine, schema)
    recoveries: list[WorkerRecoveredEvent] = []
    healthy = recovery_worker(database_url, schema, engine, observing(recoveries))
    isolated = recovery_worker(pg_proxy.url, schema, engine, observing(recoveries))

    isolated_job = utils.add_raw_job("net_long", {"who": "isolated"})
    async with running(isolated):
        # The isolated worker starts alone, so the job is its own (a loaded machine may
        # fence it briefly first, and it runs the job again: the same pair twice).
        await await_for(
            lambda: set(started(engine, schema)) == {(isolated_job.id, isolated.worker_id)},
            WAIT,
            what="the isolated worker running its job",
        )
        async with running(healthy):
            pg_proxy.partition()
            try:
                await await_for(
                    lambda: (isolated_job.id, healthy.worker_id) in started(engine, schema),
                    WAIT,
                    what="the healthy worker recovering and running the isolated one's job",
                )
            finally:
                pg_proxy.heal()

    assert overlapping_runs(run_log(engine, schema)) == []
    assert self_sweeps(recoveries) == []
    assert any(isolated.worker_id in e.dead_worker_ids for e in recoveries)
