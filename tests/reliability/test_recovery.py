"""Crash recovery: the worker registry, heartbeats, stale-worker sweeps, mixed fleets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from recovery_process import FAST, WIRED, make_worker, record_run, run_recovering
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import TIMEOUT, await_for, execute, running, wait_for

from sqla_graphile import (
    JobSpec,
    SweepResult,
    SweepStaleWorkersOptions,
    Worker,
    WorkerContext,
    WorkerRecoveryConfig,
    WorkerUtils,
    task,
)
from sqla_graphile._drive import drive
from sqla_graphile._urls import async_engine_from_url
from sqla_graphile._version import __version__
from sqla_graphile.errors import MigrationError
from sqla_graphile.hooks import Hooks, JobLockLostEvent, WorkerRecoveredEvent
from sqla_graphile.recovery import heartbeat_op
from sqla_graphile.schema import quote_schema
from sqla_graphile.worker.recovery import RecoveryAgent

SCRIPT = Path(__file__).resolve().parents[1] / "recovery_process.py"
RECOVERY_LOGGER = "sqla_graphile.worker.recovery"

#: Heartbeats often, never judged dead within a test, sweeps rarely (first at start).
STEADY = WorkerRecoveryConfig(
    enabled=True,
    heartbeat_interval=timedelta(seconds=0.2),
    sweep_interval=timedelta(seconds=60),
    sweep_threshold=timedelta(seconds=60),
    recovery_delay=timedelta(0),
)


# -- helpers ----------------------------------------------------------------------------


def register(
    engine: Engine, schema: str, worker_id: str, age: str = "0 seconds", **metadata: Any
) -> None:
    """A registry row whose last heartbeat was ``age`` ago."""
    execute(
        engine,
        f"insert into {quote_schema(schema)}._sqla_graphile_workers "
        "(worker_id, started_at, last_heartbeat_at, metadata) values "
        "(:w, now() - cast(:age as interval), now() - cast(:age as interval), "
        "cast(:meta as jsonb))",
        w=worker_id,
        age=age,
        meta=None if not metadata else json.dumps(metadata),
    )


def lock(
    engine: Engine, schema: str, job_id: int, holder: str, age: str = "0 seconds", attempts: int = 1
) -> None:
    """Lock a job (and its queue) as ``holder`` did ``age`` ago, after fetching it."""
    s = quote_schema(schema)
    execute(
        engine,
        f"update {s}._private_jobs set locked_by = :h, locked_at = now() - cast(:age as interval), "
        "attempts = :a where id = :id",
        h=holder,
        age=age,
        a=attempts,
        id=job_id,
    )
    execute(
        engine,
        f"update {s}._private_job_queues q set locked_by = :h, "
        f"locked_at = now() - cast(:age as interval) from {s}._private_jobs j "
        "where j.id = :id and q.id = j.job_queue_id",
        h=holder,
        age=age,
        id=job_id,
    )


def job_row(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    found = execute(
        engine,
        f"select *, run_at <= now() as due from {quote_schema(schema)}._private_jobs "
        "where id = :id",
        id=job_id,
    )
    return dict(found[0]) if found else None


def queue_lock(engine: Engine, schema: str, name: str) -> str | None:
    found = execute(
        engine,
        f"select locked_by from {quote_schema(schema)}._private_job_queues where queue_name = :q",
        q=name,
    )
    return found[0]["locked_by"] if found else None


def registry(engine: Engine, schema: str) -> dict[str, dict[str, Any]]:
    found = execute(
        engine, f"select * from {quote_schema(schema)}._sqla_graphile_workers order by worker_id"
    )
    return {row["worker_id"]: dict(row) for row in found}


def snapshot(engine: Engine, schema: str) -> list[list[Any]]:
    s = quote_schema(schema)
    return [
        [dict(r) for r in execute(engine, f"select * from {s}.{table} order by 1")]
        for table in ("_private_jobs", "_private_job_queues", "_sqla_graphile_workers")
    ]


def db_now(engine: Engine) -> datetime:
    value: datetime = execute(engine, "select clock_timestamp() as t")[0]["t"]
    return value


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def sweep_as_stale(engine: Engine, schema: str, worker_id: str) -> SweepResult:
    """Sweep ``worker_id`` as if its heartbeat had stopped an hour ago (it may be alive).

    A running agent's own sweep may hold the sweep lock for a moment: then try again.
    The transaction runs in a thread: agents on this loop must go on meanwhile.
    """

    def attempt() -> SweepResult:
        with engine.connect() as connection, connection.begin():
            connection.execute(
                text(
                    f"update {quote_schema(schema)}._sqla_graphile_workers "
                    "set last_heartbeat_at = now() - interval '1 hour' where worker_id = :w"
                ),
                {"w": worker_id},
            )
            result = WorkerUtils(connection, schema).sweep_stale_workers(
                SweepStaleWorkersOptions(recovery_delay=timedelta(0))
            )
            if result.already_running:
                connection.rollback()
            return result

    while True:
        result = await asyncio.to_thread(attempt)
        if not result.already_running:
            return result
        await asyncio.sleep(0.05)


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


# -- configuration ----------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = WorkerRecoveryConfig()
    assert config.enabled is True
    assert (config.heartbeat_interval, config.sweep_interval) == (
        timedelta(seconds=30),
        timedelta(seconds=60),
    )
    assert (config.sweep_threshold, config.recovery_delay) == (
        timedelta(minutes=5),
        timedelta(seconds=30),
    )
    changed = config.with_options(enabled=True, recovery_delay=timedelta(0))
    assert (changed.enabled, changed.recovery_delay, changed.sweep_threshold) == (
        True,
        timedelta(0),
        timedelta(minutes=5),
    )
    with pytest.raises(FrozenInstanceError):
        config.enabled = True  # type: ignore[misc]
    for name in ("heartbeat_interval", "sweep_interval", "sweep_threshold"):
        for bad in (timedelta(0), timedelta(seconds=-1)):
            with pytest.raises(ValueError, match=name):
                WorkerRecoveryConfig(**{name: bad})
    with pytest.raises(ValueError, match="recovery_delay"):
        WorkerRecoveryConfig(recovery_delay=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="shorter than sweep_threshold"):
        WorkerRecoveryConfig(heartbeat_interval=timedelta(minutes=5))


def test_sweep_options_validation() -> None:
    assert SweepStaleWorkersOptions() == SweepStaleWorkersOptions(None, None, False)
    SweepStaleWorkersOptions(recovery_delay=timedelta(0))  # zero delay: run at once
    for bad in (timedelta(0), timedelta(seconds=-5)):
        with pytest.raises(ValueError, match="sweep_threshold"):
            SweepStaleWorkersOptions(sweep_threshold=bad)
    with pytest.raises(ValueError, match="recovery_delay"):
        SweepStaleWorkersOptions(recovery_delay=timedelta(seconds=-1))


async def test_disabled_config_registers_nothing(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    """``enabled=False`` turns the default recovery off: nothing is registered."""
    done: list[int] = []

    @task("noop")
    def noop(payload: Any, ctx: WorkerContext) -> None:
        done.append(ctx.job.id)

    extra: dict[str, Any] = {"recovery": WorkerRecoveryConfig(enabled=False)} if WIRED else {}
    worker = Worker(async_engine, [noop], schema=schema, poll_interval=0.1, **extra)
    job = utils.add_raw_job("noop")
    async with running(worker):
        await await_for(lambda: job.id in done, what="the job")
        assert registry(engine, schema) == {}
    assert registry(engine, schema) == {}
    worker.close()


# -- registry, heartbeats, listing ------------------------------------------------------


async def test_list_active_workers_reports_metadata_and_staleness(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    worker_id = uid("py")
    agent = RecoveryAgent(
        async_engine, schema, worker_id, STEADY, task_identifiers=["b_task", "a_task"]
    )
    await agent.register()
    register(engine, schema, "old-w", "10 minutes", pid=1)
    listed = utils.list_active_workers(timedelta(seconds=60))
    assert [w.worker_id for w in listed] == [worker_id, "old-w"]  # freshest first
    fresh, old = listed
    assert fresh.metadata == {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "tasks": ["a_task", "b_task"],
        "version": __version__,
        "worker_id": worker_id,
    }
    assert fresh.started_at <= fresh.last_heartbeat_at
    assert fresh.started_at.tzinfo is not None
    assert not fresh.is_stale and fresh.heartbeat_age < timedelta(seconds=60)
    assert old.is_stale and old.heartbeat_age >= timedelta(minutes=10)
    assert old.metadata == {"pid": 1}
    # A longer threshold makes nobody stale; the default (5 minutes) only old-w.
    assert not any(w.is_stale for w in utils.list_active_workers(timedelta(hours=1)))
    assert [w.worker_id for w in utils.list_active_workers() if w.is_stale] == ["old-w"]


def test_staleness_is_judged_by_the_database_clock(engine: Engine, schema: str) -> None:
    register(engine, schema, "edge")
    register(engine, schema, "past")
    s = quote_schema(schema)
    # In one transaction now() is one instant: a heartbeat exactly the threshold old is
    # not stale (strict, as the sweep's test), a microsecond more is. Only the
    # database's own clock can draw that line.
    with engine.connect() as connection, connection.begin():
        connection.execute(
            text(
                f"update {s}._sqla_graphile_workers set last_heartbeat_at = now() - "
                "(case worker_id when 'edge' then interval '60 seconds' "
                "else interval '60.000001 seconds' end)"
            )
        )
        listed = {
            w.worker_id: w
            for w in WorkerUtils(connection, schema).list_active_workers(timedelta(seconds=60))
        }
    assert listed["edge"].heartbeat_age == timedelta(seconds=60)
    assert listed["edge"].is_stale is False
    assert listed["past"].heartbeat_age == timedelta(seconds=60, microseconds=1)
    assert listed["past"].is_stale is True


def test_heartbeat_keeps_started_at_and_metadata(engine: Engine, schema: str) -> None:
    with engine.begin() as connection:
        assert drive(connection, heartbeat_op(schema, "w1", {"pid": 7})) is True
    first = registry(engine, schema)["w1"]
    execute(
        engine,
        f"update {quote_schema(schema)}._sqla_graphile_workers "
        "set started_at = started_at - interval '1 hour', "
        "last_heartbeat_at = last_heartbeat_at - interval '1 hour'",
    )
    with engine.begin() as connection:
        # A heartbeat without metadata keeps what was registered.
        assert drive(connection, heartbeat_op(schema, "w1", None)) is False
    second = registry(engine, schema)["w1"]
    assert second["metadata"] == {"pid": 7}
    assert second["started_at"] == first["started_at"] - timedelta(hours=1)
    assert second["last_heartbeat_at"] >= first["last_heartbeat_at"]
    with engine.begin() as connection:
        drive(connection, heartbeat_op(schema, "w1", {"pid": 8}))
    assert registry(engine, schema)["w1"]["metadata"] == {"pid": 8}


async def test_stop_deregisters_unless_locks_are_still_held(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    clean, holding = uid("clean"), uid("holding")
    async with RecoveryAgent(async_engine, schema, clean, STEADY):
        assert clean in registry(engine, schema)
    assert clean not in registry(engine, schema)

    job = utils.add_raw_job("t", spec=JobSpec(queue_name="hq"))
    agent = RecoveryAgent(async_engine, schema, holding, STEADY)
    await agent.register()
    agent.start()
    await asyncio.to_thread(lock, engine, schema, job.id, holding)  # an unwritten outcome
    await agent.stop()
    # The row stays, goes stale, and a sweep then recovers the job quickly.
    assert holding in registry(engine, schema)
    execute(
        engine,
        f"update {quote_schema(schema)}._sqla_graphile_workers "
        "set last_heartbeat_at = now() - interval '10 minutes'",
    )
    result = utils.sweep_stale_workers()
    assert (result.worker_ids, result.job_ids, result.queue_names) == (
        [holding],
        [job.id],
        ["hq"],
    )
    assert registry(engine, schema) == {}


async def test_stop_ends_a_loop_that_swallowed_its_cancellation(
    engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    """Python 3.11's ``asyncio.wait_for`` (around every heartbeat) can swallow the
    cancellation ``stop`` sends, when the heartbeat completes just then; the loop then
    goes on. Here a heartbeat swallows it on purpose: ``stop`` still ends the loop and
    deregisters the worker."""
    worker_id = uid("w")
    agent = RecoveryAgent(async_engine, schema, worker_id, STEADY)
    await agent.register()
    entered = asyncio.Event()
    swallowed: list[bool] = []
    real_heartbeat = agent.heartbeat

    async def heartbeat() -> bool:
        if swallowed:
            return await real_heartbeat()
        entered.set()
        try:
            await asyncio.sleep(TIMEOUT)
        except asyncio.CancelledError:
            swallowed.append(True)
            return await real_heartbeat()  # as if the call had completed as it was cancelled
        return False

    agent.heartbeat = heartbeat  # type: ignore[method-assign]
    agent.start()
    await await_for(entered.is_set, what="a heartbeat in flight")
    await asyncio.wait_for(agent.stop(), TIMEOUT)
    assert swallowed == [True]
    assert worker_id not in registry(engine, schema)


async def test_register_without_registry_table_is_a_clear_error(
    engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    execute(engine, f"drop table {quote_schema(schema)}._sqla_graphile_workers")
    agent = RecoveryAgent(async_engine, schema, uid("w"), STEADY)
    with pytest.raises(MigrationError, match="_sqla_graphile_workers does not exist"):
        await agent.register()
    assert agent.registered is False


# -- sweeps -----------------------------------------------------------------------------


def test_stale_worker_jobs_are_recovered(engine: Engine, schema: str, utils: WorkerUtils) -> None:
    register(engine, schema, "dead-w", "10 minutes")
    register(engine, schema, "live-w")
    dead_jobs = [utils.add_raw_job("t", {"n": n}) for n in range(2)]
    later = utils.add_raw_job(
        "t", spec=JobSpec(run_at=datetime.now().astimezone() + timedelta(hours=1))
    )
    live_job = utils.add_raw_job("t")
    for job in dead_jobs:
        lock(engine, schema, job.id, "dead-w", "6 minutes", attempts=2)
    lock(engine, schema, later.id, "dead-w", "6 minutes", attempts=1)
    lock(engine, schema, live_job.id, "live-w", "1 hour")
    with engine.connect() as connection, connection.begin():
        result = WorkerUtils(connection, schema).sweep_stale_workers_with_config(
            WorkerRecoveryConfig(recovery_delay=timedelta(milliseconds=750))
        )
        # In the sweep's transaction now() is the sweep's: the delay is exact.
        delays = {
            row.id: row.delay
            for row in connection.execute(
                text(
                    f"select id, run_at - now() as delay from {quote_schema(schema)}._private_jobs"
                )
            )
        }
    assert result.worker_ids == ["dead-w"]
    assert result.job_ids == sorted([*(j.id for j in dead_jobs), later.id])
    assert result.recovered_count == 3
    assert (result.dry_run, result.already_running) == (False, False)
    for job in dead_jobs:
        row = job_row(engine, schema, job.id)
        assert row is not None
        # The interrupted attempt keeps counting, as under Node's 4-hour rule.
        assert (row["locked_by"], row["locked_at"], row["attempts"]) == (None, None, 2)
        assert row["last_error"] == "Job recovered after worker dead-w stopped heartbeating"
        # Sub-second delays are kept, not truncated to whole seconds.
        assert delays[job.id] == timedelta(milliseconds=750)
    later_row = job_row(engine, schema, later.id)
    assert later_row is not None and later_row["attempts"] == 1
    assert delays[later.id] > timedelta(minutes=59)  # run_at only ever moves later
    live = job_row(engine, schema, live_job.id)
    assert live is not None and live["locked_by"] == "live-w"  # alive: left alone
    assert set(registry(engine, schema)) == {"live-w"}
    assert utils.sweep_stale_workers().worker_ids == []


def test_queued_job_recovery_unlocks_the_queue(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t", spec=JobSpec(queue_name="serial"))
    waiting = utils.add_raw_job("t", spec=JobSpec(queue_name="serial"))
    lock(engine, schema, job.id, "dead-w", "10 minutes")
    result = utils.sweep_stale_workers(SweepStaleWorkersOptions(recovery_delay=timedelta(0)))
    assert (result.worker_ids, result.job_ids, result.queue_names) == (
        ["dead-w"],
        [job.id],
        ["serial"],
    )
    assert queue_lock(engine, schema, "serial") is None
    row = job_row(engine, schema, job.id)
    assert row is not None and (row["locked_by"], row["attempts"], row["due"]) == (None, 1, True)
    untouched = job_row(engine, schema, waiting.id)
    assert untouched is not None and (untouched["attempts"], untouched["last_error"]) == (0, None)


def test_sweeps_in_parallel_transactions_recover_once(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t")
    lock(engine, schema, job.id, "dead-w", "10 minutes", attempts=2)
    with engine.connect() as first, engine.connect() as second:
        with first.begin():
            one = WorkerUtils(first, schema).sweep_stale_workers()
            assert one.job_ids == [job.id]
            with second.begin():
                two = WorkerUtils(second, schema).sweep_stale_workers()
        with second.begin():
            three = WorkerUtils(second, schema).sweep_stale_workers()
    # The second saw the first still running, and says so rather than "nothing stale".
    assert two.already_running and (two.worker_ids, two.job_ids) == ([], [])
    assert not three.already_running and (three.worker_ids, three.job_ids) == ([], [])
    row = job_row(engine, schema, job.id)
    assert row is not None and row["attempts"] == 2  # recovered once, attempt kept


def test_concurrent_sweeps_recover_a_job_once(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t")
    lock(engine, schema, job.id, "dead-w", "10 minutes", attempts=3)
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def sweep() -> None:
        barrier.wait()
        results.append(utils.sweep_stale_workers())

    threads = [threading.Thread(target=sweep) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(results) == 6
    assert sum(r.recovered_count for r in results) == 1
    assert sum(r.worker_ids == ["dead-w"] for r in results) == 1
    row = job_row(engine, schema, job.id)
    assert row is not None and (row["locked_by"], row["attempts"]) == (None, 3)


def test_a_heartbeat_in_flight_saves_the_worker(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "slow-w", "10 minutes")
    job = utils.add_raw_job("t")
    lock(engine, schema, job.id, "slow-w", "10 minutes")
    results: list[Any] = []
    with engine.connect() as heartbeat, heartbeat.begin():
        drive(heartbeat, heartbeat_op(schema, "slow-w", None))  # not committed yet
        sweeper = threading.Thread(
            target=lambda: results.append(
                utils.sweep_stale_workers(SweepStaleWorkersOptions(timedelta(minutes=1)))
            )
        )
        sweeper.start()
        wait_for(
            lambda: execute(
                engine,
                "select 1 from pg_stat_activity where wait_event_type = 'Lock' "
                "and datname = current_database() and query like :pattern",
                pattern=f"%{schema}._sqla_graphile_workers%",
            ),
            what="the sweep to wait for the heartbeat's row lock",
        )
    sweeper.join(TIMEOUT)
    # The sweep re-read the row after the heartbeat committed: the worker is alive.
    assert results[0].worker_ids == [] and results[0].job_ids == []
    row = job_row(engine, schema, job.id)
    assert row is not None and row["locked_by"] == "slow-w"
    assert "slow-w" in registry(engine, schema)


@pytest.fixture
def landscape(engine: Engine, schema: str, utils: WorkerUtils) -> dict[str, int]:
    """A dead registered worker, a live one, and an unregistered holder past 4 hours."""
    register(engine, schema, "dead-w", "10 minutes")
    register(engine, schema, "live-w")
    jobs = {
        "dead": utils.add_raw_job("t", spec=JobSpec(queue_name="dq")).id,
        "live": utils.add_raw_job("t").id,
        "expired": utils.add_raw_job("t").id,
    }
    lock(engine, schema, jobs["dead"], "dead-w", "10 minutes")
    lock(engine, schema, jobs["live"], "live-w", "10 minutes")
    lock(engine, schema, jobs["expired"], "pool-expired", "5 hours")
    return jobs


def test_dry_run_reports_and_changes_nothing(
    engine: Engine, schema: str, utils: WorkerUtils, landscape: dict[str, int]
) -> None:
    before = snapshot(engine, schema)
    result = utils.sweep_stale_workers(SweepStaleWorkersOptions(dry_run=True))
    assert result.dry_run and not result.already_running
    assert result.worker_ids == ["dead-w", "pool-expired"]
    assert result.job_ids == sorted([landscape["dead"], landscape["expired"]])
    assert result.queue_names == ["dq"]
    assert result.recovered_count == 2
    assert snapshot(engine, schema) == before
    # The real sweep then does what the dry run announced.
    real = utils.sweep_stale_workers()
    assert (real.worker_ids, real.job_ids, real.queue_names) == (
        result.worker_ids,
        result.job_ids,
        result.queue_names,
    )


def test_sweep_with_config_takes_its_defaults_from_the_config(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "quiet-w", "2 minutes")
    job = utils.add_raw_job("t")
    lock(engine, schema, job.id, "quiet-w", "2 minutes")
    # The default threshold (5 minutes) finds nobody dead.
    assert utils.sweep_stale_workers().worker_ids == []
    config = WorkerRecoveryConfig(
        heartbeat_interval=timedelta(seconds=10),
        sweep_threshold=timedelta(minutes=1),
        recovery_delay=timedelta(hours=2),
    )
    # Options win over the config where given.
    kept = utils.sweep_stale_workers_with_config(
        config, SweepStaleWorkersOptions(sweep_threshold=timedelta(minutes=3))
    )
    assert kept.worker_ids == []
    result = utils.sweep_stale_workers_with_config(config)
    assert result.worker_ids == ["quiet-w"]
    row = execute(
        engine,
        f"select run_at - now() as delay from {quote_schema(schema)}._private_jobs",
    )[0]
    assert timedelta(hours=1, minutes=59) < row["delay"] <= timedelta(hours=2)


async def test_async_utils_sweep_and_list(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    from sqla_graphile import AsyncWorkerUtils

    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t")
    lock(engine, schema, job.id, "dead-w", "10 minutes")
    autils = AsyncWorkerUtils(async_engine, schema)
    assert [w.worker_id for w in await autils.list_active_workers()] == ["dead-w"]
    result = await autils.sweep_stale_workers_with_config(
        WorkerRecoveryConfig(), SweepStaleWorkersOptions(recovery_delay=timedelta(0))
    )
    assert (result.worker_ids, result.job_ids) == (["dead-w"], [job.id])


# -- mixed fleets and force unlock ------------------------------------------------------


def test_mixed_fleet_unregistered_holders_follow_node_4_hour_rule(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "py-live")
    recent = utils.add_raw_job("t", spec=JobSpec(queue_name="qa")).id
    old = utils.add_raw_job("t", spec=JobSpec(queue_name="qb")).id
    same_holder_recent = utils.add_raw_job("t").id
    live_long = utils.add_raw_job("t").id
    node_pool = "pool-3f9a0c1e-b7d2-4e55-9a61-0c8f2d7e4b13"
    lock(engine, schema, recent, "pool-abc123", "10 minutes", attempts=1)
    lock(engine, schema, old, node_pool, "4 hours 1 minute", attempts=1)
    lock(engine, schema, same_holder_recent, node_pool, "10 minutes", attempts=1)
    lock(engine, schema, live_long, "py-live", "5 hours", attempts=1)
    started = db_now(engine)
    result = utils.sweep_stale_workers()
    # A Node worker running a 10-minute job is never taken for dead; a lock older than
    # Node's own 4-hour expiry is released the way Node would release it.
    assert result.worker_ids == [node_pool]
    assert (result.job_ids, result.queue_names) == ([old], ["qb"])
    swept = job_row(engine, schema, old)
    assert swept is not None
    assert (swept["locked_by"], swept["locked_at"]) == (None, None)
    assert swept["attempts"] == 1  # Node's rule: the crashed attempt counts
    assert swept["last_error"] is None
    assert swept["run_at"] >= started - timedelta(seconds=1) and swept["due"]
    assert queue_lock(engine, schema, "qb") is None
    for job_id, holder in (
        (recent, "pool-abc123"),
        (same_holder_recent, node_pool),
        (live_long, "py-live"),  # registered and heartbeating: alive whatever its lock age
    ):
        row = job_row(engine, schema, job_id)
        assert row is not None and (row["locked_by"], row["attempts"]) == (holder, 1)
    assert queue_lock(engine, schema, "qa") == "pool-abc123"
    assert set(registry(engine, schema)) == {"py-live"}


def test_force_unlock_clears_exactly_those_locks_and_keeps_the_registry(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "w-a", "10 minutes")
    register(engine, schema, "w-b")
    a = utils.add_raw_job("t", spec=JobSpec(queue_name="qa")).id
    b = utils.add_raw_job("t", spec=JobSpec(queue_name="qb")).id
    lock(engine, schema, a, "w-a", attempts=2)
    lock(engine, schema, b, "w-b", attempts=2)
    before = registry(engine, schema)
    utils.force_unlock_workers(["w-a", "never-registered"])
    row_a, row_b = job_row(engine, schema, a), job_row(engine, schema, b)
    assert row_a is not None and row_b is not None
    # A plain unlock: no refund, no delay, no note; the registry is the sweep's business.
    assert (row_a["locked_by"], row_a["attempts"], row_a["last_error"]) == (None, 2, None)
    assert (queue_lock(engine, schema, "qa"), queue_lock(engine, schema, "qb")) == (None, "w-b")
    assert row_b["locked_by"] == "w-b"
    assert registry(engine, schema) == before
    # The stale w-a is still swept (its row removed) though it holds nothing any more.
    result = utils.sweep_stale_workers()
    assert (result.worker_ids, result.job_ids) == (["w-a"], [])
    assert set(registry(engine, schema)) == {"w-b"}


# -- the agent --------------------------------------------------------------------------


async def test_agent_sweeps_and_emits_worker_recovered(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    register(engine, schema, "dead-w", "10 minutes")
    job = utils.add_raw_job("t", spec=JobSpec(queue_name="dq"))
    lock(engine, schema, job.id, "dead-w", "10 minutes")
    events: list[WorkerRecoveredEvent] = []
    hooks = Hooks()
    hooks.on("worker_recovered")(events.append)
    me = uid("sweeper")
    async with RecoveryAgent(async_engine, schema, me, FAST, hooks=hooks):
        await await_for(lambda: events, what="worker_recovered")
        assert events == [WorkerRecoveredEvent(me, ("dead-w",), (job.id,), ("dq",))]
        assert events[0].jobs_recovered == 1
        assert set(registry(engine, schema)) == {me}
    assert registry(engine, schema) == {}
    row = job_row(engine, schema, job.id)
    assert row is not None and row["locked_by"] is None


async def test_heartbeats_survive_a_terminated_connection(
    engine: Engine, database_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = uid("gw-heartbeat")
    own = async_engine_from_url(database_url, connect_args={"application_name": app})
    worker_id = uid("w")
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    try:
        async with RecoveryAgent(own, schema, worker_id, STEADY):
            first = registry(engine, schema)[worker_id]["last_heartbeat_at"]
            await await_for(
                lambda: registry(engine, schema)[worker_id]["last_heartbeat_at"] > first,
                what="a heartbeat",
            )
            # Every connection the agent holds dies under it, as in a server restart.
            killed = execute(
                engine,
                "select pg_terminate_backend(pid) as ok from pg_stat_activity "
                "where application_name = :app",
                app=app,
            )
            assert killed and all(r["ok"] for r in killed)
            cut = db_now(engine)
            await await_for(
                lambda: messages(caplog, "heartbeat of worker"), what="a failed heartbeat"
            )
            await await_for(
                lambda: registry(engine, schema)[worker_id]["last_heartbeat_at"] > cut,
                what="heartbeats to resume",
            )
            await await_for(lambda: messages(caplog, "resumed"), what="the resumption logged")
        assert worker_id not in registry(engine, schema)
    finally:
        await own.dispose()


async def test_a_hung_heartbeat_is_abandoned_and_retried(
    engine: Engine, async_engine: AsyncEngine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker_id = uid("w")
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    # A threshold of 1 s bounds each heartbeat to 1 s: later it would be of no use.
    config = FAST.with_options(sweep_interval=timedelta(seconds=60))
    release = threading.Event()
    locked = threading.Event()

    def hold_the_registry() -> None:
        with engine.connect() as connection, connection.begin():
            connection.execute(
                text(
                    f"lock table {quote_schema(schema)}._sqla_graphile_workers "
                    "in access exclusive mode"
                )
            )
            locked.set()
            release.wait(TIMEOUT)

    async with RecoveryAgent(async_engine, schema, worker_id, config):
        holder = threading.Thread(target=hold_the_registry)
        holder.start()
        try:
            await await_for(locked.is_set, what="the table lock")
            await await_for(
                lambda: len(messages(caplog, "heartbeat of worker")) >= 2,
                what="heartbeats to time out",
            )
        finally:
            release.set()
            await asyncio.to_thread(holder.join, TIMEOUT)
        cut = db_now(engine)
        await await_for(
            lambda: registry(engine, schema)[worker_id]["last_heartbeat_at"] > cut,
            what="heartbeats to resume",
        )
    assert all("TimeoutError" in m for m in messages(caplog, "heartbeat of worker"))
    assert registry(engine, schema) == {}


async def test_heartbeats_and_sweeps_survive_an_outage(
    engine: Engine, async_engine: AsyncEngine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = quote_schema(schema)
    worker_id = uid("w")
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    config = FAST.with_options(sweep_threshold=timedelta(seconds=30))
    async with RecoveryAgent(async_engine, schema, worker_id, config) as agent:
        # The registry vanishes for a while: every heartbeat and sweep fails meanwhile.
        # (DDL waits for the agent's locks, so it runs off the agent's loop.)
        await asyncio.to_thread(
            execute, engine, f"alter table {s}._sqla_graphile_workers rename to away"
        )
        await await_for(
            lambda: len(messages(caplog, "heartbeat of worker")) >= 3, what="failed heartbeats"
        )
        await await_for(lambda: messages(caplog, "recovery sweep"), what="a failed sweep")
        # A worker died during the outage.
        execute(
            engine,
            f"insert into {s}.away (worker_id, last_heartbeat_at) "
            "values ('dead-w', now() - interval '10 minutes')",
        )
        job = WorkerUtils(engine, schema).add_raw_job("t")
        lock(engine, schema, job.id, "dead-w", "10 minutes")
        await asyncio.to_thread(
            execute, engine, f"alter table {s}.away rename to _sqla_graphile_workers"
        )
        cut = db_now(engine)
        await await_for(
            lambda: registry(engine, schema)[worker_id]["last_heartbeat_at"] > cut,
            what="heartbeats to resume",
        )
        await await_for(
            lambda: "dead-w" not in registry(engine, schema), what="the sweep to resume"
        )
        assert agent.registered
    row = job_row(engine, schema, job.id)
    assert row is not None and row["locked_by"] is None
    assert registry(engine, schema) == {}


async def test_agent_registers_again_after_being_swept(
    engine: Engine, async_engine: AsyncEngine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker_id = uid("paused")
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    async with RecoveryAgent(async_engine, schema, worker_id, STEADY, task_identifiers=["t"]):
        # As if the worker had stalled past the threshold: judged dead, row removed.
        swept = await sweep_as_stale(engine, schema, worker_id)
        assert swept.worker_ids == [worker_id]
        await await_for(lambda: worker_id in registry(engine, schema), what="re-registration")
        await await_for(lambda: messages(caplog, "presumed dead"), what="the warning")
        row = registry(engine, schema)[worker_id]
        assert row["metadata"]["tasks"] == ["t"] and row["metadata"]["pid"] == os.getpid()
    assert worker_id not in registry(engine, schema)


async def test_a_sweep_that_registers_again_warns_as_a_heartbeat_does(
    engine: Engine, async_engine: AsyncEngine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The sweep heartbeats first in its transaction: when that heartbeat recreates the
    # row, the worker was presumed dead meanwhile and must say so, whichever loop noticed.
    worker_id = uid("swept")
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    agent = RecoveryAgent(async_engine, schema, worker_id, STEADY, task_identifiers=["t"])
    await agent.register()  # no loops: this test runs the sweep itself
    try:
        swept = await sweep_as_stale(engine, schema, worker_id)
        assert swept.worker_ids == [worker_id]
        assert not messages(caplog, "presumed dead")
        result = await agent.sweep()
        assert result is not None and worker_id not in result.worker_ids
        assert worker_id in registry(engine, schema)
        assert messages(caplog, "presumed dead")
    finally:
        await agent.stop()
    assert worker_id not in registry(engine, schema)


# -- workers: crashes and late outcomes -------------------------------------------------


@pytest.fixture
def runs_table(engine: Engine, schema: str) -> Iterator[None]:
    execute(
        engine,
        f"create table {quote_schema(schema)}.recovery_runs "
        "(job_id bigint, worker_id text, phase text, attempts int, last_error text)",
    )
    yield


def runs(engine: Engine, schema: str) -> list[tuple[int, str, str]]:
    found = execute(
        engine,
        f"select job_id, worker_id, phase from {quote_schema(schema)}.recovery_runs "
        "order by job_id, worker_id, phase",
    )
    return [(r["job_id"], r["worker_id"], r["phase"]) for r in found]


class ScriptProcess:
    """``recovery_process.py`` in a subprocess, its output collected line by line."""

    def __init__(self, database_url: str, schema: str, concurrency: int) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), database_url, schema, str(concurrency)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def value(self, prefix: str) -> str | None:
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        self._reader.join(5)


async def test_sigkilled_workers_jobs_are_recovered_and_run_once(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils, runs_table: None
) -> None:
    long_job = utils.add_raw_job("sleepy", {"seconds": 300})
    long_queued = utils.add_raw_job("sleepy", {"seconds": 300}, JobSpec(queue_name="q"))
    behind = utils.add_raw_job("sleepy", {"seconds": 0}, JobSpec(queue_name="q"))
    proc = ScriptProcess(database_url, schema, concurrency=2)
    try:
        await await_for(
            lambda: (
                (
                    proc.value(f"STARTED {long_job.id}") is not None
                    and proc.value(f"STARTED {long_queued.id}") is not None
                )
                or proc.process.poll() is not None
            ),
            what="the first worker to start both long jobs",
        )
        dead = proc.value("WORKER")
        assert dead is not None and proc.process.poll() is None, proc.lines
        assert dead in registry(engine, schema)
    finally:
        proc.kill()  # SIGKILL in the middle of both jobs: no cleanup of any kind
    assert proc.process.returncode == -9
    assert queue_lock(engine, schema, "q") == dead

    seen: dict[int, tuple[int, str | None]] = {}
    events: list[WorkerRecoveredEvent] = []
    hooks = Hooks()
    hooks.on("worker_recovered")(events.append)

    @task("sleepy")
    def quick(payload: Any, ctx: WorkerContext) -> None:
        seen[ctx.job.id] = (ctx.job.attempts, ctx.job.last_error)
        record_run(engine, schema, ctx.job.id, ctx.worker_id, "started")
        record_run(engine, schema, ctx.job.id, ctx.worker_id, "finished")

    rescuer = make_worker(
        database_url, [quick], FAST, schema=schema, poll_interval=0.1, hooks=hooks
    )
    runner = asyncio.create_task(run_recovering(rescuer, FAST, database_url))
    try:
        await await_for(
            lambda: (
                not execute(engine, f"select 1 from {quote_schema(schema)}._private_jobs")
                or runner.done()
            ),
            what="every job to complete",
        )
        assert not runner.done()
        assert dead not in registry(engine, schema)
    finally:
        rescuer.request_shutdown()
        await asyncio.wait_for(runner, TIMEOUT)
        rescuer.close()
    me = rescuer.worker_id
    assert runs(engine, schema) == sorted(
        [
            (long_job.id, dead, "started"),
            (long_job.id, me, "finished"),
            (long_job.id, me, "started"),
            (long_queued.id, dead, "started"),
            (long_queued.id, me, "finished"),
            (long_queued.id, me, "started"),
            (behind.id, me, "finished"),
            (behind.id, me, "started"),
        ]
    )
    note = f"Job recovered after worker {dead} stopped heartbeating"
    # The interrupted attempt still counts: the re-run is attempt 2.
    assert seen == {long_job.id: (2, note), long_queued.id: (2, note), behind.id: (1, None)}
    assert [(e.worker_id, e.dead_worker_ids) for e in events] == [(me, (dead,))]
    assert sorted(events[0].job_ids) == sorted([long_job.id, long_queued.id])
    assert events[0].queue_names == ("q",)
    assert queue_lock(engine, schema, "q") is None
    assert registry(engine, schema) == {}


@pytest.mark.parametrize("late_outcome", ["complete", "fail"])
async def test_a_recovered_worker_writes_nothing_over_the_rerun(
    engine: Engine,
    async_engine: AsyncEngine,
    database_url: str,
    schema: str,
    utils: WorkerUtils,
    late_outcome: str,
) -> None:
    gates: dict[str, asyncio.Event] = {}
    started: list[tuple[int, str]] = []
    finished: list[tuple[int, str]] = []

    @task("hold")
    async def hold(payload: Any, ctx: WorkerContext) -> None:
        started.append((ctx.job.id, ctx.worker_id))
        await gates[ctx.worker_id].wait()
        finished.append((ctx.job.id, ctx.worker_id))
        if late_outcome == "fail" and ctx.worker_id == first.worker_id:
            raise RuntimeError("too late to fail")

    lost: list[JobLockLostEvent] = []
    hooks = Hooks()
    hooks.on("job_lock_lost")(lost.append)
    # One slot and no prefetch: busy with the job, the first worker cannot take it back.
    first = make_worker(
        async_engine,
        [hold],
        STEADY,
        schema=schema,
        poll_interval=0.1,
        hooks=hooks,
        concurrency=1,
        local_queue_size=0,
    )
    second = Worker(async_engine, [hold], schema=schema, poll_interval=0.1)
    gates[first.worker_id] = asyncio.Event()
    gates[second.worker_id] = asyncio.Event()
    job = utils.add_raw_job("hold")
    first_run = asyncio.create_task(run_recovering(first, STEADY, database_url))
    try:
        await await_for(lambda: (job.id, first.worker_id) in started, what="the first run")
        # The first worker stalls past the threshold (simulated): a sweep takes its job.
        swept = await sweep_as_stale(engine, schema, first.worker_id)
        assert swept.job_ids == [job.id]
        async with running(second):
            await await_for(lambda: (job.id, second.worker_id) in started, what="the re-run")
            rerun = job_row(engine, schema, job.id)
            assert rerun is not None and rerun["locked_by"] == second.worker_id
            # The first worker finishes now: its outcome must not touch the re-run.
            gates[first.worker_id].set()
            await await_for(lambda: lost, what="the first worker to notice its lost lock")
            assert [(e.job.id, e.worker_id, e.outcome) for e in lost] == [
                (job.id, first.worker_id, late_outcome)
            ]
            assert job_row(engine, schema, job.id) == rerun
            gates[second.worker_id].set()
            await await_for(lambda: job_row(engine, schema, job.id) is None, what="completion")
    finally:
        for gate in gates.values():
            gate.set()
        first.request_shutdown()
        await asyncio.wait_for(first_run, TIMEOUT)
        first.close()
        second.close()
    assert sorted(finished) == sorted([(job.id, first.worker_id), (job.id, second.worker_id)])
    assert registry(engine, schema) == {}


@pytest.mark.skipif(not WIRED, reason="Worker has no recovery= option yet")
async def test_worker_option_registers_heartbeats_and_deregisters(
    engine: Engine, async_engine: AsyncEngine, schema: str
) -> None:
    @task("t")
    def noop(payload: Any, ctx: WorkerContext) -> None:
        return None

    worker = make_worker(async_engine, [noop], STEADY, schema=schema, poll_interval=0.1)
    async with running(worker):
        await await_for(lambda: worker.worker_id in registry(engine, schema), what="registration")
        first = registry(engine, schema)[worker.worker_id]["last_heartbeat_at"]
        await await_for(
            lambda: registry(engine, schema)[worker.worker_id]["last_heartbeat_at"] > first,
            what="a heartbeat",
        )
    assert registry(engine, schema) == {}
