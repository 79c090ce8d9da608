"""Asyncio primitives of the worker.

``bounded`` replaces ``asyncio.wait_for`` everywhere in the worker: before Python 3.12,
``wait_for`` drops a cancellation that arrives as the awaited thing completes, and a task
that lost its cancellation keeps a shutdown waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["Flag", "bounded", "wait_event"]

_T = TypeVar("_T")

#: Seconds a cancelled step is given to unwind before its caller's cancellation goes on.
_UNWIND = 1.0


class Flag:
    """An :class:`asyncio.Event` for the fetcher, whose timed wait makes no task.

    A timed wait through a task of its own would cost a few turns of the loop between a
    notification and the fetch it triggers.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float) -> None:
        """Return once set, or after ``timeout`` seconds."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.remove(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def bounded(awaitable: Awaitable[_T], timeout: float) -> _T:
    """Await ``awaitable`` for ``timeout`` seconds at most.

    After ``timeout``, ``awaitable`` is cancelled and :class:`asyncio.TimeoutError`
    raised. A cancellation of the caller is never lost: it cancels ``awaitable`` and
    propagates, even when ``awaitable`` has just completed.
    """
    inner = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((inner,), timeout=timeout)
    except asyncio.CancelledError:
        inner.cancel()
        # Give it a moment to unwind (a statement cancelled, a connection closed), so
        # that a loop closing right after is not left to cut it off; not longer, so that
        # a silent link cannot hold the cancellation up.
        await asyncio.wait((inner,), timeout=_UNWIND)
        raise
    if not done:
        inner.cancel()
        # Let it unwind (release what it holds) before the caller goes on.
        await asyncio.wait((inner,))
        raise asyncio.TimeoutError
    return inner.result()


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event``, or ``timeout`` seconds at most."""
    with contextlib.suppress(asyncio.TimeoutError):
        await bounded(event.wait(), timeout)
