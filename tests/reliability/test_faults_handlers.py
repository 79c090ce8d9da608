"""Handlers that misbehave: interrupts raised by ``async def`` handlers, a handler raising
``CancelledError`` itself, a run cancelled twice, and an awaitable that never finishes."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import (
    TIMEOUT,
    await_for,
    execute,
    running,
    wait_for,
)

from sqla_graphile import Hooks, JobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema


def job_state(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    found = execute(
        engine,
        "select id, attempts, locked_by, last_error "
        f"from {quote_schema(schema)}._private_jobs where id = :id",
        id=job_id,
    )
    return dict(found[0]) if found else None


def failed(engine: Engine, schema: str, job_id: int) -> bool:
    """Whether the job's failure is written: unlocked, with an error."""
    row = job_state(engine, schema, job_id)
    return row is not None and row["locked_by"] is None and row["last_error"] is not None


def held_by(engine: Engine, schema: str, worker_id: str) -> list[tuple[str, Any]]:
    """Jobs and queues still locked by ``worker_id``."""
    s = quote_schema(schema)
    jobs = execute(engine, f"select id from {s}._private_jobs where locked_by = :w", w=worker_id)
    queues = execute(
        engine, f"select queue_name from {s}._private_job_queues where locked_by = :w", w=worker_id
    )
    return [("job", r["id"]) for r in jobs] + [("queue", r["queue_name"]) for r in queues]


def with_hooks(path: str) -> Hooks:
    """Hooks that make the worker run jobs directly, or through its interceptor path."""
    hooks = Hooks()
    if path == "observed":
        hooks.on("job_start")(lambda event: None)
    return hooks


class WorkerThread:
    """``worker.run_async()`` on an event loop of its own, in a daemon thread.

    An interrupt escaping a worker's loop then ends that thread, never the test session;
    what ended the run is kept in :attr:`error`.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._main, name="faults-worker", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            asyncio.run(self.worker.run_async())
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def stop(self) -> None:
        """Shut the worker down gracefully; a request made before it started is retried."""
        wait_for(
            lambda: self.worker.request_shutdown() or self.done.wait(0.2),
            what="the worker thread to stop",
        )
        self.thread.join(TIMEOUT)


@contextlib.contextmanager
def worker_thread(worker: Worker) -> Iterator[WorkerThread]:
    runner = WorkerThread(worker)
    try:
        yield runner
    finally:
        runner.stop()


def interrupt(kind: str) -> None:
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("stop right there")
    if kind == "SystemExit":
        raise SystemExit(3)
    sys.exit()


# -- (5) interrupts raised by async def handlers ----------------------------------------


@pytest.mark.parametrize("style", ["async def", "def"])
@pytest.mark.parametrize("path", ["direct", "observed"])
@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "sys.exit()"])
def test_handler_interrupt_fails_its_job_and_the_worker_goes_on(
    engine: Engine, schema: str, utils: WorkerUtils, kind: str, path: str, style: str
) -> None:
    """A handler (``async def`` or ``def``) raising ``KeyboardInterrupt``/``SystemExit``
    (or calling ``sys.exit()``) fails its job, with one text for both kinds; the jobs that
    had finished before it are completed, the worker keeps running, and jobs added
    afterwards run too."""
    name = "KeyboardInterrupt" if kind == "KeyboardInterrupt" else "SystemExit"
    finished: list[int] = []

    @task("quick")
    async def quick(payload: Any, ctx: WorkerContext) -> None:
        finished.append(ctx.job.id)

    @task("rude")
    async def rude(payload: Any, ctx: WorkerContext) -> None:
        # Raise only once the quick jobs have finished (their completions may still be
        # waiting to be written: they are batched for a while).
        for _ in range(int(TIMEOUT / 0.01)):
            if len(finished) >= 3:
                break
            await asyncio.sleep(0.01)
        interrupt(kind)

    @task("rude")
    def rude_def(payload: Any, ctx: WorkerContext) -> None:
        for _ in range(int(TIMEOUT / 0.01)):
            if len(finished) >= 3:
                break
            time.sleep(0.01)
        interrupt(kind)

    before = [utils.add_raw_job("quick", {"n": n}) for n in range(3)]
    bad = utils.add_raw_job("rude", {}, JobSpec(max_attempts=1))
    worker = Worker(
        engine,
        [quick, rude if style == "async def" else rude_def],
        schema=schema,
        concurrency=4,
        poll_interval=0.1,
        complete_batch_delay=0.5,
        hooks=with_hooks(path),
    )
    with worker_thread(worker) as runner:
        wait_for(
            lambda: runner.done.is_set() or failed(engine, schema, bad.id),
            what="the interrupted job to be failed",
        )
        assert not runner.done.is_set(), f"the worker stopped: {runner.error!r}"
        row = job_state(engine, schema, bad.id)
        assert row is not None and (row["attempts"], row["locked_by"]) == (1, None)
        assert row["last_error"].startswith(f"RuntimeError: the handler raised {name}")
        for job in before:
            wait_for(lambda j=job: job_state(engine, schema, j.id) is None, what="completion")
        after = [utils.add_raw_job("quick", {"n": n}) for n in range(3, 6)]
        for job in after:
            wait_for(
                lambda j=job: job_state(engine, schema, j.id) is None or runner.done.is_set(),
                what="a job added afterwards to complete",
            )
        assert not runner.done.is_set(), f"the worker stopped: {runner.error!r}"
    assert runner.error is None
    assert held_by(engine, schema, worker.worker_id) == []


@pytest.mark.parametrize("path", ["direct", "observed"])
async def test_async_handler_raising_cancelled_error_itself_is_not_a_shutdown(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils, path: str
) -> None:
    """A handler that raises ``CancelledError`` when nobody cancelled it fails its job
    with that error ("CancelledError…"), not with the shutdown's grace-period text; the
    worker goes on with its other jobs."""

    @task("self_cancel")
    async def self_cancel(payload: Any, ctx: WorkerContext) -> None:
        raise asyncio.CancelledError("raised by the handler")

    @task("fine")
    async def fine(payload: Any, ctx: WorkerContext) -> None:
        return None

    bad = utils.add_raw_job("self_cancel", {}, JobSpec(max_attempts=1))
    worker = Worker(
        async_engine,
        [self_cancel, fine],
        schema=schema,
        poll_interval=0.1,
        shutdown_grace_period=5.0,
        hooks=with_hooks(path),
    )
    async with running(worker) as task_:
        await await_for(
            lambda: failed(engine, schema, bad.id) or task_.done(), what="the job to be failed"
        )
        later = utils.add_raw_job("fine")
        await await_for(
            lambda: job_state(engine, schema, later.id) is None or task_.done(),
            what="the next job",
        )
        assert not task_.done()
    row = job_state(engine, schema, bad.id)
    assert row is not None and row["attempts"] == 1
    assert row["last_error"].startswith("CancelledError"), row["last_error"]
    assert "grace period" not in row["last_error"]


# -- (10) shutdown: a second cancel, and awaitables that never finish ------------------


async def test_cancelling_twice_still_writes_completions_within_the_grace_period(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    """A second ``cancel()`` of the ``run_async()`` task during its graceful shutdown does
    not cut the shutdown short: jobs finishing within the grace period are completed
    before the task ends (with ``CancelledError``) and nothing stays locked."""
    started: list[int] = []

    @task("steady")
    async def steady(payload: Any, ctx: WorkerContext) -> None:
        started.append(ctx.job.id)
        await asyncio.sleep(payload["seconds"])

    jobs = [
        utils.add_raw_job("steady", {"seconds": 2.0}, JobSpec(queue_name=f"q{n}")) for n in (1, 2)
    ]
    worker = Worker(
        async_engine,
        [steady],
        schema=schema,
        concurrency=2,
        poll_interval=0.1,
        shutdown_grace_period=TIMEOUT,
    )
    run = asyncio.create_task(worker.run_async())
    try:
        await await_for(lambda: len(started) == 2 or run.done(), what="both jobs to start")
        assert not run.done()
        run.cancel()
        await asyncio.sleep(0.2)  # let the first cancellation start the shutdown
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, TIMEOUT)
        # The moment the task has ended, both completions are written.
        remaining = [job.id for job in jobs if job_state(engine, schema, job.id) is not None]
        assert remaining == [], "jobs finishing within the grace period were not completed"
        assert held_by(engine, schema, worker.worker_id) == []
    finally:
        if not run.done():
            worker.request_shutdown()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(run, TIMEOUT)
        # Today a shutdown cut short goes on in the background: let it end first.
        with contextlib.suppress(AssertionError):
            await await_for(lambda: not held_by(engine, schema, worker.worker_id), timeout=10.0)


def handler_threads(baseline: set[threading.Thread]) -> list[str]:
    """The worker's threads (named ``sqla_graphile…``) alive now and not in ``baseline``."""
    return [
        thread.name
        for thread in threading.enumerate()
        if thread not in baseline and thread.is_alive() and thread.name.startswith("sqla_graphile")
    ]


async def test_def_handler_returning_a_never_ending_awaitable_frees_its_thread(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils
) -> None:
    """A ``def`` handler returning an awaitable that never finishes (it even ignores
    cancellation) does not leave a handler thread blocked after the worker returned."""
    entered = threading.Event()
    release = threading.Event()  # lets the awaitable end once the test is over

    async def endless() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue  # never finishes, cancelled or not

    @task("endless")
    def returns_endless(payload: Any, ctx: WorkerContext) -> Any:
        entered.set()
        return endless()

    baseline = set(threading.enumerate())
    job = utils.add_raw_job("endless", {}, JobSpec(max_attempts=1))
    worker = Worker(
        async_engine,
        [returns_endless],
        schema=schema,
        poll_interval=0.1,
        shutdown_grace_period=0.5,
    )
    try:
        async with running(worker):
            await await_for(entered.is_set, what="the handler to run")
        row = job_state(engine, schema, job.id)
        assert row is not None and row["locked_by"] is None and row["last_error"] is not None
        with contextlib.suppress(AssertionError):
            await await_for(lambda: not handler_threads(baseline), timeout=10.0)
        assert handler_threads(baseline) == [], "a handler thread is still blocked"
    finally:
        release.set()
