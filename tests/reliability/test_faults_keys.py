"""Job keys and the local queue: a keyed job fetched ahead but not started honours a later
``add_job(REPLACE)`` or ``remove_job``, as with Node's defaults, and is never handed back
runnable at shutdown."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from worker_fixtures import TIMEOUT, await_for, execute, running

from sqla_graphile import JobKeyMode, JobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema

KEY = "the-key"


def job_state(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    found = execute(
        engine,
        "select id, key, attempts, max_attempts, locked_by "
        f"from {quote_schema(schema)}._private_jobs where id = :id",
        id=job_id,
    )
    return dict(found[0]) if found else None


def runnable(row: dict[str, Any] | None) -> bool:
    """Whether a job's row would be fetched again (once due)."""
    return row is not None and row["locked_by"] is None and row["attempts"] < row["max_attempts"]


async def settle(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait (bounded) for ``condition``; go on either way (an ordering aid, not a check)."""
    with contextlib.suppress(AssertionError):
        await await_for(condition, timeout=timeout)


class Scenario:
    """One slot, the default local queue: a blocking job runs while a keyed job waits,
    fetched ahead (locked by the worker) but not started."""

    def __init__(self, engine: Engine, schema: str, utils: WorkerUtils, bind: Any) -> None:
        self.engine, self.schema, self.utils = engine, schema, utils
        self.blocking = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []
        lock = threading.Lock()

        @task("block")
        def block(payload: Any, ctx: WorkerContext) -> None:
            self.blocking.set()
            self.release.wait(TIMEOUT)

        @task("keyed")
        def keyed(payload: Any, ctx: WorkerContext) -> None:
            with lock:
                self.seen.append(payload["v"])

        self.blocker = utils.add_raw_job("block", {}, JobSpec(priority=-10))
        self.old = utils.add_raw_job("keyed", {"v": "old"}, JobSpec(job_key=KEY))
        # A local queue that certainly fetches ahead (the default one may not, for slow
        # jobs: it holds only about 0.1 s of recent throughput).
        self.worker = Worker(
            bind,
            [block, keyed],
            schema=schema,
            concurrency=1,
            poll_interval=0.1,
            local_queue_size=10,
        )

    async def fetched_ahead(self) -> None:
        await await_for(self.blocking.is_set, what="the blocking job to start")
        await await_for(
            lambda: (
                (job_state(self.engine, self.schema, self.old.id) or {}).get("locked_by")
                == self.worker.worker_id
            ),
            what="the keyed job to be fetched ahead (locked by the worker)",
        )
        assert self.seen == []

    def change(self, how: str) -> None:
        if how == "replace":
            self.utils.add_raw_job(
                "keyed", {"v": "new"}, JobSpec(job_key=KEY, job_key_mode=JobKeyMode.REPLACE)
            )
        else:
            self.utils.remove_job(KEY)


@pytest.mark.parametrize("how", ["replace", "remove"])
async def test_keyed_job_fetched_ahead_honours_replace_and_remove(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils, how: str
) -> None:
    """After ``add_job(REPLACE)`` only the new payload runs and the old never does; after
    ``remove_job`` the job never runs; in both cases the old row is not left runnable."""
    s = Scenario(engine, schema, utils, async_engine)
    async with running(s.worker):
        try:
            await s.fetched_ahead()
            s.change(how)
        finally:
            s.release.set()
        # Queued behind everything else: once it ran, the keyed job had its chance.
        utils.add_raw_job("keyed", {"v": "last"}, JobSpec(priority=10))
        await await_for(lambda: "last" in s.seen, what="the last job")
        if how == "replace":
            assert "new" in s.seen
        await await_for(
            lambda: job_state(engine, schema, s.blocker.id) is None, what="the blocker's completion"
        )
    assert "old" not in s.seen, f"the replaced/removed payload ran: {s.seen}"
    assert sorted(s.seen) == (["last", "new"] if how == "replace" else ["last"])
    assert not runnable(job_state(engine, schema, s.old.id))


@pytest.mark.parametrize("how", ["replace", "remove"])
async def test_detached_keyed_job_is_not_returned_runnable_at_shutdown(
    engine: Engine, async_engine: AsyncEngine, schema: str, utils: WorkerUtils, how: str
) -> None:
    """A keyed job replaced or removed while queued locally is not handed back runnable
    by a shutdown (no row with its id is unlocked with attempts left), and never runs."""
    s = Scenario(engine, schema, utils, async_engine)
    async with running(s.worker):
        try:
            await s.fetched_ahead()
            s.change(how)
            s.worker.request_shutdown()
            # Let the shutdown deal with the local queue before the slot frees up.
            await settle(
                lambda: (
                    (job_state(engine, schema, s.old.id) or {}).get("locked_by")
                    != s.worker.worker_id
                )
            )
        finally:
            s.release.set()
    assert "old" not in s.seen
    row = job_state(engine, schema, s.old.id)
    assert not runnable(row), f"the detached job was returned runnable: {row}"
