"""LISTEN wake-ups, the 4-hour sweep, lost locks, the local queue, hooks and shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from worker_fixtures import await_for, execute, rows, running

from sqla_graphile import (
    Continue,
    Fail,
    Hooks,
    JobSpec,
    RawJobSpec,
    Skip,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile.errors import DatabaseNewerThanLibrary
from sqla_graphile.schema import quote_schema
from sqla_graphile.worker.listener import insert_count, reconnect_delay

done: list[Any] = []


@task("record")
async def record(payload: Any, ctx: WorkerContext) -> None:
    done.append(payload)


@pytest.fixture(autouse=True)
def _clear() -> None:
    done.clear()


def test_listener_helpers_follow_node() -> None:
    assert insert_count('{"r":"x","count":3}') == 3
    assert insert_count("") == 1 and insert_count("not json") == 1 and insert_count("{}") == 1
    assert insert_count('{"count":-1}') == -1
    assert reconnect_delay(0, jitter=0.5) == 0.025
    assert reconnect_delay(1, jitter=0.99) == pytest.approx(0.135)
    assert reconnect_delay(30, jitter=0.5) == 30.0  # ceil(0.5 × 60 000) ms


async def test_listen_wakes_an_idle_worker(engine: Engine, schema: str) -> None:
    worker = Worker(engine, [record], schema=schema, poll_interval=60.0)
    async with running(worker):
        await await_for(lambda: worker.listening, what="LISTEN")
        await asyncio.sleep(0.1)  # let the first (empty) fetches settle into the idle wait
        WorkerUtils(engine, schema).add_raw_job("record", {"n": 1})
        await await_for(lambda: done == [{"n": 1}], what="notified job")


async def test_breaking_migration_notification_stops_the_worker(
    engine: Engine, schema: str
) -> None:
    """A breaking ``worker:migrate`` stops the worker only once its own ledger holds a
    breaking migration it does not know; ``run_async`` then raises."""
    reasons: list[str] = []
    worker = Worker(engine, [record], schema=schema, poll_interval=60.0)
    worker.hooks.on("worker_stop")(lambda e: reasons.append(e.reason))
    task_ = asyncio.create_task(worker.run_async())
    await await_for(lambda: worker.listening, what="LISTEN")
    notify = "select pg_notify('worker:migrate', :payload)"
    execute(engine, notify, payload='{"migrationNumber":21,"breaking":false}')
    execute(engine, notify, payload='{"migrationNumber":21,"breaking":true}')
    await asyncio.sleep(0.3)
    assert not task_.done()  # nothing new in this schema's ledger
    ledger = f"{quote_schema(schema)}.migrations"
    execute(engine, f"insert into {ledger} (id, breaking) values (21, true)")
    execute(engine, notify, payload='{"migrationNumber":21,"breaking":true}')
    with pytest.raises(DatabaseNewerThanLibrary):
        await asyncio.wait_for(task_, 30)
    assert reasons == ["migrate"]


def test_stale_locks_are_swept_after_four_hours(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    table = f"{quote_schema(schema)}._private_jobs"
    queues = f"{quote_schema(schema)}._private_job_queues"
    stale = utils.add_raw_job("record", {"n": "stale"}, JobSpec(queue_name="sq"))
    fresh = utils.add_raw_job("record", {"n": "fresh"})
    execute(
        engine,
        f"update {table} set locked_by = 'dead', attempts = 1, locked_at = now() - "
        f"interval '5 hours', run_at = now() - interval '6 hours' where id = :id",
        id=stale.id,
    )
    execute(
        engine,
        f"update {queues} set locked_by = 'dead', locked_at = now() - interval '5 hours'",
    )
    execute(
        engine,
        f"update {table} set locked_by = 'alive', attempts = 1, locked_at = now() - "
        f"interval '3 hours' where id = :id",
        id=fresh.id,
    )
    Worker(engine, [record], schema=schema).run_once()  # sweeps before its first fetch
    assert done == [{"n": "stale"}]
    (left,) = rows(engine, schema)
    assert left["id"] == fresh.id and left["locked_by"] == "alive" and left["attempts"] == 1


@pytest.mark.parametrize("outcome", ["complete", "fail"])
@pytest.mark.parametrize("theft", ["cleared", "stolen"])
async def test_lost_lock_writes_nothing_and_fires_the_hook(
    engine: Engine,
    schema: str,
    utils: WorkerUtils,
    caplog: pytest.LogCaptureFixture,
    outcome: str,
    theft: str,
) -> None:
    release = asyncio.Event()
    events: list[tuple[str, Any]] = []

    @task("slow")
    async def slow(payload: Any, ctx: WorkerContext) -> None:
        done.append(ctx.job.id)
        await release.wait()
        if outcome == "fail":
            raise RuntimeError("too late")

    hooks = Hooks()
    for name in ("job_complete", "job_fail", "job_lock_lost"):
        hooks.on(name)(lambda e, name=name: events.append((name, e)))
    job = utils.add_raw_job("slow", {}, JobSpec(queue_name="lq"))
    worker = Worker(engine, [slow], schema=schema, hooks=hooks, poll_interval=60.0)
    table = f"{quote_schema(schema)}._private_jobs"
    new_owner = "NULL" if theft == "cleared" else "'someone_else'"
    async with running(worker):
        await await_for(lambda: done == [job.id], what="job start")
        execute(
            engine,
            f"update {table} set locked_by = {new_owner}, "
            f"locked_at = case when {new_owner} is null then null else now() end",
        )
        with caplog.at_level(logging.WARNING, logger="sqla_graphile.worker"):
            release.set()
            await await_for(lambda: events, what="lock lost event")
    assert [name for name, _ in events] == ["job_lock_lost"]
    assert events[0][1].job.id == job.id and events[0][1].outcome == outcome
    assert any("lock is no longer held" in r.getMessage() for r in caplog.records)
    (row,) = rows(engine, schema)  # neither deleted nor failed
    assert row["last_error"] is None and row["attempts"] == 1
    assert row["locked_by"] == (None if theft == "cleared" else "someone_else")


@pytest.mark.parametrize("intercepted", [False, True], ids=["plain", "intercepted"])
async def test_a_context_variable_set_by_one_job_is_not_seen_by_the_next(
    engine: Engine, schema: str, utils: WorkerUtils, intercepted: bool
) -> None:
    """Each job runs in a context of its own; its handler sees what its interceptor set.

    Jobs run one after another (concurrency 1), each started as the one before ends;
    what a handler (or a ``before_job_run`` interceptor) sets in a ``ContextVar`` stays
    with its job.
    """
    seen: contextvars.ContextVar[int | None] = contextvars.ContextVar("seen", default=None)
    marked: contextvars.ContextVar[int | None] = contextvars.ContextVar("marked", default=None)
    hooks = Hooks()
    if intercepted:

        @hooks.before_job_run
        def mark(ctx: Any) -> None:
            assert marked.get() is None, "an interceptor saw the job before's mark"
            marked.set(ctx.job.payload["n"])

    @task("context_leak")
    async def context_leak(payload: Any, ctx: WorkerContext) -> None:
        done.append((payload["n"], seen.get(), marked.get()))
        seen.set(payload["n"])

    utils.add_raw_jobs([RawJobSpec("context_leak", {"n": n}) for n in range(5)])
    worker = Worker(
        engine,
        [context_leak],
        schema=schema,
        concurrency=1,
        local_queue_size=5,
        poll_interval=60.0,
        hooks=hooks,
    )
    async with running(worker):
        await await_for(lambda: len(done) == 5, what="every job run")
    assert sorted(done) == [(n, None, n if intercepted else None) for n in range(5)]


async def test_unstarted_local_queue_jobs_are_returned_on_shutdown(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    gate = threading.Event()

    @task("blocking")
    def blocking(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload["n"])
        gate.wait(30)

    for n in range(4):
        utils.add_raw_job("blocking", {"n": n})
    worker = Worker(
        engine, [blocking], schema=schema, concurrency=1, local_queue_size=5, poll_interval=60.0
    )
    async with running(worker):
        await await_for(lambda: done == [0], what="first job")
        locked = rows(engine, schema, "locked_by is not null")
        assert len(locked) == 4 and {r["attempts"] for r in locked} == {1}
        worker.request_shutdown()
        # The unstarted jobs go back before the running one is awaited.
        await await_for(
            lambda: len(rows(engine, schema, "locked_by is null")) == 3, what="returned jobs"
        )
        gate.set()
    left = rows(engine, schema)
    assert [r["payload"]["n"] for r in left] == [1, 2, 3]
    assert all(r["attempts"] == 0 and r["locked_at"] is None for r in left)


async def test_local_queue_returns_jobs_after_its_ttl(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    gate = threading.Event()

    @task("blocking")
    def blocking(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload["n"])
        gate.wait(30)

    for n in range(3):
        utils.add_raw_job("blocking", {"n": n})
    worker = Worker(
        engine,
        [blocking],
        schema=schema,
        concurrency=1,
        local_queue_size=5,
        local_queue_ttl=0.2,
        poll_interval=0.1,
    )
    async with running(worker):
        await await_for(lambda: done == [0], what="first job")
        await await_for(
            lambda: len(rows(engine, schema, "locked_by is null and attempts = 0")) == 2,
            what="TTL return",
        )
        gate.set()
        await await_for(lambda: not rows(engine, schema), what="all jobs")
    assert sorted(done) == [0, 1, 2]


async def test_hooks_events_and_interceptors(
    engine: Engine, schema: str, utils: WorkerUtils, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = Hooks()
    events: list[tuple[str, Any]] = []
    for name in ("worker_start", "worker_stop", "job_fetch", "job_start", "job_complete"):
        hooks.on(name)(lambda e, name=name: events.append((name, e)))

    @hooks.on("job_fail")
    async def on_fail(event: Any) -> None:
        events.append(("job_fail", event))

    @hooks.on("job_complete")
    def broken_observer(event: Any) -> None:
        raise RuntimeError("observer bug")

    @hooks.before_job_run
    async def before(ctx: Any) -> Any:
        action = ctx.payload.get("before")
        if action == "skip":
            return Skip()
        if action == "fail":
            return Fail("refused by before_job_run")
        if action == "rewrite":
            return Continue({**ctx.payload, "rewritten": True})
        return None

    @hooks.after_job_run
    def after(ctx: Any) -> Any:
        action = ctx.job.payload.get("after")
        if action == "skip":
            assert isinstance(ctx.error, RuntimeError)
            return Skip()
        if action == "fail":
            assert ctx.error is None and ctx.duration >= 0
            return Fail("refused by after_job_run")
        return Continue()

    @task("hooked")
    async def hooked(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload)
        if payload.get("raise"):
            raise RuntimeError("handler error")

    ids = {
        name: utils.add_raw_job("hooked", payload).id
        for name, payload in {
            "plain": {},
            "skip": {"before": "skip"},
            "before_fail": {"before": "fail"},
            "rewrite": {"before": "rewrite"},
            "after_skip": {"after": "skip", "raise": True},
            "after_fail": {"after": "fail"},
        }.items()
    }
    worker = Worker(engine, [hooked], schema=schema, hooks=hooks)
    with caplog.at_level(logging.ERROR, logger="sqla_graphile.hooks"):
        await worker.run_once_async()

    assert {"before": "skip"} not in done
    assert {"before": "rewrite", "rewritten": True} in done
    left = {r["id"]: r for r in rows(engine, schema)}
    assert set(left) == {ids["before_fail"], ids["after_fail"]}
    assert left[ids["before_fail"]]["last_error"] == "refused by before_job_run"
    assert left[ids["after_fail"]]["last_error"] == "refused by after_job_run"

    names = [name for name, _ in events]
    assert names[0] == "worker_start" and names[-1] == "worker_stop"
    assert events[0][1].worker_id == worker.worker_id and events[-1][1].reason == "finished"
    assert names.count("job_fetch") == 6
    started = {e.job.id for name, e in events if name == "job_start"}
    assert ids["skip"] not in started and ids["before_fail"] not in started
    completed = {e.job.id for name, e in events if name == "job_complete"}
    assert completed == {ids["plain"], ids["skip"], ids["rewrite"], ids["after_skip"]}
    failed = {e.job.id for name, e in events if name == "job_fail"}
    assert failed == {ids["before_fail"], ids["after_fail"]}
    assert any("observer bug" in (r.exc_text or "") for r in caplog.records)


async def test_shutdown_cancels_after_grace_and_fails_what_still_runs(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    signals: list[bool] = []

    @task("async_forever")
    async def async_forever(payload: Any, ctx: WorkerContext) -> None:
        done.append("async")
        await asyncio.sleep(60)

    @task("polite")
    def polite(payload: Any, ctx: WorkerContext) -> None:
        done.append("polite")
        signals.append(ctx.cancellation.wait(60))
        raise RuntimeError("stopped on request")

    @task("stubborn")
    def stubborn(payload: Any, ctx: WorkerContext) -> None:
        done.append("stubborn")
        threading.Event().wait(5)  # ignores the cancellation signal

    for identifier in ("async_forever", "polite", "stubborn"):
        utils.add_raw_job(identifier, {})
    worker = Worker(
        engine,
        [async_forever, polite, stubborn],
        schema=schema,
        shutdown_grace_period=0.3,
        poll_interval=60.0,
    )
    async with running(worker):
        await await_for(lambda: len(done) == 3, what="three running jobs")
    errors = {r["task_identifier"]: r for r in rows(engine, schema)}
    assert errors["async_forever"]["last_error"] == (
        "Worker shutdown: job cancelled after the 0.3 s grace period"
    )
    assert errors["polite"]["last_error"].startswith("RuntimeError: stopped on request")
    assert errors["stubborn"]["last_error"] == (
        "Worker shutdown: job still running after the 0.3 s grace period"
    )
    assert signals == [True]
    for row in errors.values():
        assert row["locked_by"] is None and row["attempts"] == 1
        assert row["run_at"] > row["created_at"]  # backoff applied


async def test_def_handlers_and_their_coroutines_never_exceed_the_concurrency(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    lock = threading.Lock()
    running_now = [0]
    peak = [0]

    def enter() -> None:
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])

    def leave() -> None:
        with lock:
            running_now[0] -= 1

    @task("short")
    def short(payload: Any, ctx: WorkerContext) -> None:
        enter()
        threading.Event().wait(0.002)
        leave()
        done.append("short")

    @task("returns_coroutine")
    def returns_coroutine(payload: Any, ctx: WorkerContext) -> Any:
        enter()

        async def rest() -> None:
            try:
                await asyncio.sleep(0.01)
            finally:
                leave()
            done.append("coroutine")

        return rest()

    utils.add_raw_jobs(
        [RawJobSpec("short", {}) for _ in range(60)]
        + [RawJobSpec("returns_coroutine", {}) for _ in range(20)]
    )
    worker = Worker(engine, [short, returns_coroutine], schema=schema, concurrency=3)
    await worker.run_once_async()
    assert sorted(done) == ["coroutine"] * 20 + ["short"] * 60
    assert 1 <= peak[0] <= 3
    assert not rows(engine, schema)


async def test_coroutine_returned_by_a_def_is_cancelled_after_the_grace_period(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    @task("returns_forever")
    def returns_forever(payload: Any, ctx: WorkerContext) -> Any:
        done.append("started")
        return asyncio.sleep(60)

    utils.add_raw_job("returns_forever", {})
    worker = Worker(
        engine, [returns_forever], schema=schema, shutdown_grace_period=0.2, poll_interval=60.0
    )
    async with running(worker):
        await await_for(lambda: done == ["started"], what="the job")
    [row] = rows(engine, schema)
    assert row["last_error"] == "Worker shutdown: job cancelled after the 0.2 s grace period"
    assert row["locked_by"] is None and row["attempts"] == 1


@dataclass
class StrictAsync(TaskHandler):
    IDENTIFIER: ClassVar[str] = "strict_async"
    a: int

    async def run(self, ctx: WorkerContext) -> None:
        pass


async def test_a_full_local_queue_of_undecodable_payloads_fails_job_by_job(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    # Each job fails before its handler starts; they must not pile up on each other.
    utils.add_raw_jobs([RawJobSpec("strict_async", {"b": n}) for n in range(600)])
    worker = Worker(engine, [StrictAsync], schema=schema, local_queue_size=600)
    await worker.run_once_async()
    left = rows(engine, schema)
    assert len(left) == 600
    assert all(r["last_error"].startswith("TypeError:") and r["attempts"] == 1 for r in left)


async def test_worker_works_through_a_one_connection_pool(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    # Too small to lend the fetcher and writers connections of their own.
    async_engine = create_async_engine(
        engine.url.set(drivername="postgresql+psycopg_async"), pool_size=1, max_overflow=0
    )
    for n in range(5):
        utils.add_raw_job("record", {"n": n})
    try:
        await Worker(async_engine, [record], schema=schema).run_once_async()
    finally:
        await async_engine.dispose()
    assert sorted(item["n"] for item in done) == [0, 1, 2, 3, 4]
    assert not rows(engine, schema)
