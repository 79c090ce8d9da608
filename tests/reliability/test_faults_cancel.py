"""A cancellation that arrives as the awaited step completes must not be lost.

Before Python 3.12, ``asyncio.wait_for`` returns the result of an awaitable that
completed in the same turn as the caller's cancellation, and the cancellation is gone.
At shutdown the worker cancels its background tasks; a task that lost its cancellation
(the listener, just connected) runs on and the shutdown waits for ever. The worker
awaits with ``bounded`` instead, which these tests pin down.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from sqla_graphile.worker._aio import bounded
from sqla_graphile.worker.connection import listen_kwargs
from sqla_graphile.worker.listener import NotificationListener

#: Only a hang exceeds this.
WAIT = 10.0


async def test_bounded_keeps_a_cancellation_that_races_completion() -> None:
    loop = asyncio.get_running_loop()
    step: asyncio.Future[int] = loop.create_future()
    caller = asyncio.create_task(bounded(step, 60))
    await asyncio.sleep(0)  # the caller is now waiting on the step
    step.set_result(1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_bounded_returns_the_result_and_times_out() -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    ready.set_result(7)
    assert await bounded(ready, 1) == 7

    unwound = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            unwound.set()

    with pytest.raises(asyncio.TimeoutError):
        await bounded(slow(), 0.05)
    # The step was cancelled and had unwound before the timeout reached the caller.
    assert unwound.is_set()


async def test_listener_cancelled_as_its_connection_completes_stops(
    async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = psycopg.AsyncConnection.connect
    opened: list[psycopg.AsyncConnection[Any]] = []
    listener_task: asyncio.Task[None] | None = None

    async def connect_then_cancel(*args: Any, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        connection = await real_connect(*args, **kwargs)
        opened.append(connection)
        # The shutdown's cancellation lands in the turn the connection is handed back.
        assert listener_task is not None
        listener_task.cancel()
        return connection

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", connect_then_cancel)
    listener = NotificationListener(
        listen_kwargs(async_engine, 5.0),
        on_insert=lambda count: None,
        on_migrate=lambda data: None,
        on_connect=lambda: None,
        timeout=5.0,
    )
    listener_task = asyncio.create_task(listener.run())
    try:
        done, _ = await asyncio.wait({listener_task}, timeout=WAIT)
        assert listener_task in done, "the listener lost its cancellation and runs on"
        assert listener_task.cancelled()
        assert not listener.listening
    finally:
        listener_task.cancel()
        await asyncio.wait({listener_task})
        for connection in opened:
            await connection.close()
