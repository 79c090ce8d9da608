"""Helpers shared by the worker tests: background workers, waiting, reading job rows."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, text

from sqla_graphile import Worker, WorkerUtils
from sqla_graphile.schema import quote_schema

TIMEOUT = 30.0


@pytest.fixture(name="utils")
def utils_fixture(engine: Engine, schema: str) -> Iterator[WorkerUtils]:
    """Job management on the test's worker schema (import this to use ``utils``)."""
    yield WorkerUtils(engine, schema)


def wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy (no timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


async def await_for(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """``wait_for`` for async tests: yields to the loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in the background of the test's loop; stop it gracefully after."""
    task = asyncio.create_task(worker.run_async())
    await await_for(lambda: worker.running or task.done(), what="worker start")
    try:
        yield task
    finally:
        if not task.done():
            worker.request_shutdown()
        done, _ = await asyncio.wait({task}, timeout=TIMEOUT)
        if not done:
            raise AssertionError("the worker did not stop; its tasks:\n" + _task_stacks())
        await task


def _task_stacks() -> str:
    """The stack of every task of the running loop, to show where a shutdown hangs."""
    out = io.StringIO()
    for each in asyncio.all_tasks():
        each.print_stack(file=out)
    return out.getvalue()


def fetch_session(worker: Worker) -> int | None:
    """The backend pid of the worker's fetch connection, once the worker is idle.

    Idle also means listening: a LISTEN connection that comes up later wakes the fetch
    loop (notifications may have been missed), and the job a test adds next would then
    be fetched by the loop rather than from a notification.
    """
    status = worker.status
    if not (status.running and status.listening and status.idle):
        return None
    return status.fetch_session


def rows(engine: Engine, schema: str, where: str = "true") -> list[Any]:
    """The rows of ``_private_jobs`` (plus task identifier), ordered by id."""
    with engine.connect() as connection:
        return list(
            connection.execute(
                text(
                    f"select j.*, t.identifier as task_identifier "
                    f"from {quote_schema(schema)}._private_jobs j "
                    f"join {quote_schema(schema)}._private_tasks t on t.id = j.task_id "
                    f"where {where} order by j.id"
                )
            ).mappings()
        )


def execute(engine: Engine, sql: str, **params: Any) -> list[Any]:
    """Run ``sql`` in its own transaction; return its rows if any."""
    with engine.begin() as connection:
        result = connection.execute(text(sql), params)
        return list(result.mappings()) if result.returns_rows else []


def make_due(engine: Engine, schema: str) -> None:
    """Make every waiting job runnable now (attempts untouched), to retry at once."""
    execute(engine, f"update {quote_schema(schema)}._private_jobs set run_at = now()")
