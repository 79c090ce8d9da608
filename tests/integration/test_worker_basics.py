"""The worker runs every kind of handler, in Node's order, and checks its database first."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine
from worker_fixtures import (
    await_for,
    execute,
    fetch_session,
    rows,
    running,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    CleanupTask,
    DatabaseNewerThanLibrary,
    Job,
    JobSpec,
    RawJobSpec,
    SchemaNotMigrated,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile.schema import quote_schema

seen: list[tuple[str, Any]] = []


@dataclass
class SyncGreeting(TaskHandler):
    IDENTIFIER: ClassVar[str] = "sync_greeting"
    name: str

    def run(self, ctx: WorkerContext) -> None:
        seen.append(("sync_greeting", (self.name, threading.current_thread().name)))


class AsyncGreeting(BaseModel, TaskHandler):
    IDENTIFIER: ClassVar[str] = "async_greeting"
    name: str

    async def run(self, ctx: WorkerContext) -> None:
        seen.append(("async_greeting", (self.name, threading.current_thread().name)))


@task("sync_fn")
def sync_fn(payload: Any, ctx: WorkerContext) -> None:
    seen.append(("sync_fn", payload))


@dataclass
class Point:
    x: int
    y: int


@task("async_fn", payload_type=Point)
async def async_fn(payload: Point, ctx: WorkerContext) -> None:
    seen.append(("async_fn", payload))


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


def test_run_once_runs_typed_function_sync_and_async_handlers(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    utils.add_job(SyncGreeting(name="ada"))
    utils.add_job(AsyncGreeting(name="bob"))
    utils.add_raw_job("sync_fn", [1, 2])
    utils.add_raw_job("async_fn", {"x": 1, "y": 2})

    Worker(engine, [SyncGreeting, AsyncGreeting, sync_fn, async_fn], schema=schema).run_once()

    by_task = dict(seen)
    assert by_task["sync_fn"] == [1, 2]
    assert by_task["async_fn"] == Point(1, 2)
    name, thread = by_task["sync_greeting"]
    assert name == "ada" and thread.startswith("sqla_graphile-handler")
    name, thread = by_task["async_greeting"]
    assert name == "bob" and thread == threading.main_thread().name
    assert rows(engine, schema) == []


def test_context_carries_job_worker_logger_utils_and_signal(
    engine: Engine, schema: str, utils: WorkerUtils, caplog: pytest.LogCaptureFixture
) -> None:
    contexts: list[WorkerContext] = []

    @task("inspect")
    def inspect_ctx(payload: Any, ctx: WorkerContext) -> None:
        contexts.append(ctx)
        ctx.logger.info("hello from the handler")
        # The handler's utils write in their own transaction: a follow-up job.
        ctx.utils.add_raw_job("follow_up", {"from": ctx.job.id})

    job = utils.add_raw_job("inspect", {"k": "v"}, JobSpec(queue_name="q1", priority=3))
    worker = Worker(engine, [inspect_ctx], schema=schema)
    with caplog.at_level(logging.INFO, logger="sqla_graphile"):
        worker.run_once()

    (ctx,) = contexts
    assert ctx.job.id == job.id and ctx.job.payload == {"k": "v"}
    assert ctx.job.task_identifier == "inspect" and ctx.job.queue_name == "q1"
    assert ctx.job.attempts == 1 and ctx.job.priority == 3
    assert ctx.job.locked_by == worker.worker_id == ctx.worker_id
    assert ctx.worker_id.startswith("graphile_worker_") and len(ctx.worker_id) == 34
    assert isinstance(ctx.utils, WorkerUtils) and isinstance(ctx.async_utils, AsyncWorkerUtils)
    assert not ctx.cancellation.is_set
    (line,) = [r for r in caplog.records if r.getMessage().endswith("hello from the handler")]
    assert line.getMessage() == f"[job {job.id} inspect] hello from the handler"
    assert line.name == "sqla_graphile.worker.job"
    # The job in the record's extra fields, for structured logging.
    fields = vars(line)
    assert (fields["job_id"], fields["task_identifier"], fields["attempt"]) == (
        job.id,
        "inspect",
        1,
    )
    assert fields["worker_id"] == worker.worker_id
    outcome = [
        r
        for r in caplog.records
        if r.name == "sqla_graphile.worker" and r.getMessage().startswith("completed job")
    ]
    assert len(outcome) == 1 and outcome[0].levelno == logging.INFO
    assert f"job {job.id} (inspect, attempt 1/25)" in outcome[0].getMessage()
    assert " ms" in outcome[0].getMessage()
    # The follow-up job is for a task this worker does not run: it is left alone.
    (left,) = rows(engine, schema)
    assert left["task_identifier"] == "follow_up" and left["payload"] == {"from": job.id}
    assert left["attempts"] == 0 and left["locked_by"] is None


@pytest.mark.parametrize("local_queue_size", [0, 50])
def test_jobs_run_in_priority_then_run_at_order(
    engine: Engine, schema: str, utils: WorkerUtils, local_queue_size: int
) -> None:
    order: list[str] = []

    @task("ordered")
    def ordered(payload: Any, ctx: WorkerContext) -> None:
        order.append(payload["name"])

    now = datetime.now(timezone.utc)
    utils.add_raw_jobs(
        [
            RawJobSpec("ordered", {"name": "p0-late"}, JobSpec(run_at=now - timedelta(minutes=1))),
            RawJobSpec("ordered", {"name": "p0-early"}, JobSpec(run_at=now - timedelta(hours=1))),
            RawJobSpec("ordered", {"name": "p-5"}, JobSpec(priority=-5, run_at=now)),
            RawJobSpec(
                "ordered", {"name": "p7"}, JobSpec(priority=7, run_at=now - timedelta(days=1))
            ),
            RawJobSpec("ordered", {"name": "future"}, JobSpec(run_at=now + timedelta(hours=1))),
        ]
    )
    Worker(
        engine, [ordered], schema=schema, concurrency=1, local_queue_size=local_queue_size
    ).run_once()

    assert order == ["p-5", "p0-early", "p0-late", "p7"]
    (future,) = rows(engine, schema)
    assert future["payload"] == {"name": "future"} and future["attempts"] == 0


def test_refuses_an_unmigrated_or_newer_database(engine: Engine, schema_name: str) -> None:
    with pytest.raises(SchemaNotMigrated):
        Worker(engine, [sync_fn], schema=schema_name).run_once()

    from sqla_graphile import migrate

    migrate(engine, schema=schema_name)
    execute(
        engine,
        f"insert into {quote_schema(schema_name)}.migrations (id, breaking) values (21, true)",
    )
    with pytest.raises(DatabaseNewerThanLibrary):
        Worker(engine, [sync_fn], schema=schema_name).run_once()


def test_worker_accepts_url_and_async_engine(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils
) -> None:
    utils.add_raw_job("sync_fn", {"via": "url"})
    Worker(database_url, [sync_fn], schema=schema).run_once()
    from sqla_graphile._urls import async_engine_from_url

    utils.add_raw_job("sync_fn", {"via": "async engine"})
    Worker(async_engine_from_url(database_url), [sync_fn], schema=schema).run_once()
    assert [p for _, p in seen] == [{"via": "url"}, {"via": "async engine"}]
    assert rows(engine, schema) == []


def test_task_registration_errors() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        Worker("postgresql://localhost/x", [])
    with pytest.raises(ValueError, match="share the identifier"):
        Worker("postgresql://localhost/x", [sync_fn, sync_fn])
    with pytest.raises(TypeError, match="is not a task"):
        Worker("postgresql://localhost/x", [lambda p, c: None])


async def test_create_utils_cleanup_keeps_fetching(engine: Engine, schema: str) -> None:
    done: list[int] = []

    @task("survivor")
    async def survivor(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload["n"])

    worker = Worker(engine, [survivor], schema=schema, poll_interval=0.1)
    worker_utils = worker.create_utils()
    assert worker_utils.known_identifiers == {"survivor"}
    assert worker_utils.hooks is worker.hooks
    tasks_table = f"{quote_schema(schema)}._private_tasks"

    async with running(worker):
        worker_utils.add_raw_job("survivor", {"n": 1})
        await await_for(lambda: done == [1], what="first job")
        await await_for(lambda: not rows(engine, schema), what="first completion")
        # The worker's own utils keep its identifier…
        worker_utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
        assert execute(engine, f"select 1 from {tasks_table} where identifier = 'survivor'")
        # …but another process's cleanup deletes the row; a new job recreates it, with a
        # new id, and the running worker still finds it.
        before = execute(engine, f"select id from {tasks_table} where identifier = 'survivor'")
        WorkerUtils(engine, schema).cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
        assert not execute(engine, f"select 1 from {tasks_table} where identifier = 'survivor'")
        WorkerUtils(engine, schema).add_raw_job("survivor", {"n": 2})
        after = execute(engine, f"select id from {tasks_table} where identifier = 'survivor'")
        assert after[0]["id"] != before[0]["id"]
        await await_for(lambda: done == [1, 2], what="job after the cleanup")
    worker.close()


async def test_task_gc_is_noticed_at_the_next_notification(engine: Engine, schema: str) -> None:
    # Polling too rarely to help: the notification's fetch finds nothing under the cached
    # task id, so the worker looks its ids up again and fetches at once.
    done: list[int] = []

    @task("renamed_by_gc")
    async def handler(payload: Any, ctx: WorkerContext) -> None:
        done.append(payload["n"])

    worker = Worker(engine, [handler], schema=schema, poll_interval=600)
    tasks_table = f"{quote_schema(schema)}._private_tasks"
    async with running(worker):
        await await_for(lambda: worker.listening, what="LISTEN")
        before = execute(engine, f"select id from {tasks_table}")
        WorkerUtils(engine, schema).cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
        WorkerUtils(engine, schema).add_raw_job("renamed_by_gc", {"n": 1})
        assert execute(engine, f"select id from {tasks_table}") != before
        await await_for(lambda: done == [1], what="the job of the re-created task")
    worker.close()


async def test_task_gc_is_noticed_while_busy(engine: Engine, schema: str) -> None:
    # Every fetch is full (a backlog of "steady" jobs) and none comes back empty: the
    # look-up every poll interval still finds the new id of "rare", long before the
    # backlog ends.
    steady_done = 0
    rare_done_after: list[int] = []

    @task("steady")
    async def steady(payload: Any, ctx: WorkerContext) -> None:
        nonlocal steady_done
        await asyncio.sleep(0.005)
        steady_done += 1

    @task("rare")
    async def rare(payload: Any, ctx: WorkerContext) -> None:
        rare_done_after.append(steady_done)

    backlog = 2000  # at least 5 s of work at concurrency 2
    utils = WorkerUtils(engine, schema)
    utils.add_raw_jobs([RawJobSpec("steady", {}) for _ in range(backlog)])
    worker = Worker(engine, [steady, rare], schema=schema, concurrency=2, poll_interval=0.2)
    tasks_table = f"{quote_schema(schema)}._private_tasks"
    async with running(worker):
        await await_for(lambda: steady_done > 0, what="the backlog to start")
        utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])  # "rare" has no jobs: deleted
        assert not execute(engine, f"select 1 from {tasks_table} where identifier = 'rare'")
        # Ahead of the backlog by priority, once the worker knows its task's new id.
        utils.add_raw_job("rare", {}, JobSpec(priority=-1))
        await await_for(lambda: rare_done_after, what="the job of the re-created task")
    worker.close()
    assert rare_done_after[0] < backlog // 2


async def test_run_async_is_cancellable_and_shuts_down(engine: Engine, schema: str) -> None:
    stopped: list[str] = []
    worker = Worker(engine, [sync_fn], schema=schema)

    @worker.hooks.on("worker_stop")
    def on_stop(event: Any) -> None:
        stopped.append(event.reason)

    task_ = asyncio.create_task(worker.run_async())
    await await_for(lambda: worker.listening, what="LISTEN")
    task_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task_
    assert stopped == ["cancelled"]


def _tagging_loads(text: str) -> Any:
    value = json.loads(text)
    return {"decoded_by": "engine", **value} if isinstance(value, dict) else value


@pytest.mark.parametrize(
    ("quick", "pool_size"),
    [(False, 5), (True, 5), (False, 1)],
    ids=["batch_fetch", "quick_fetch", "pooled_fetch"],
)
async def test_handler_gets_the_whole_row_and_the_engines_json_deserializer(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils, quick: bool, pool_size: int
) -> None:
    """The fetched job is the row as ``get_job`` reads it while locked (timestamps, flags,
    queue) and its payload is decoded by the engine's ``json_deserializer``, whether the
    job came in a batch fetch or an idle worker's quick fetch, on a held connection or
    (a pool too small to hold one) through SQLAlchemy."""
    from sqla_graphile._urls import async_engine_from_url

    seen_jobs: list[Job] = []
    read_back: list[Job | None] = []
    held: list[bool] = []

    @task("whole")
    def whole(payload: Any, ctx: WorkerContext) -> None:
        seen_jobs.append(ctx.job)
        read_back.append(ctx.utils.get_job(ctx.job.id))
        held.append(worker.status.fetch_session is not None)

    spec = JobSpec(queue_name="wq", priority=2, max_attempts=7, flags=["f1", "f2"], job_key="k1")
    async_engine = async_engine_from_url(
        database_url, json_deserializer=_tagging_loads, pool_size=pool_size, max_overflow=0
    )
    try:
        worker = Worker(async_engine, [whole], schema=schema, poll_interval=600)
        if quick:
            async with running(worker):
                await await_for(lambda: fetch_session(worker), what="an idle worker")
                job = utils.add_raw_job("whole", {"n": 1}, spec)
                await await_for(lambda: seen_jobs, what="the handler")
        else:
            job = utils.add_raw_job("whole", {"n": 1}, spec)
            await worker.run_once_async()
    finally:
        await async_engine.dispose()

    assert held == [pool_size > 1]  # the fetch path this case means to cover
    (seen_job,) = seen_jobs
    assert seen_job.payload == {"decoded_by": "engine", "n": 1}
    (locked,) = read_back
    assert locked is not None and locked.payload == {"n": 1}
    assert seen_job == dataclasses.replace(locked, payload=seen_job.payload)
    assert seen_job.id == job.id and seen_job.flags == frozenset({"f1", "f2"})
    assert seen_job.queue_name == "wq" and seen_job.key == "k1" and seen_job.max_attempts == 7
    assert seen_job.locked_by == worker.worker_id and seen_job.attempts == 1
    assert seen_job.run_at.tzinfo is not None and seen_job.locked_at is not None
    assert seen_job.created_at == job.created_at and seen_job.revision == job.revision


async def test_status_tells_an_idle_worker_and_its_fetch_session(
    engine: Engine, schema: str
) -> None:
    @task("noop")
    def noop(payload: Any, ctx: WorkerContext) -> None:
        return None

    worker = Worker(engine, [noop], schema=schema, poll_interval=600)
    assert not worker.status.idle and worker.status.fetch_session is None
    async with running(worker):
        pid = await await_for(lambda: fetch_session(worker), what="an idle worker")
        (row,) = execute(engine, "select state from pg_stat_activity where pid = :pid", pid=pid)
        assert row["state"] == "idle"  # the session the worker holds, waiting
    assert not worker.status.idle and worker.status.fetch_session is None
    worker.close()
