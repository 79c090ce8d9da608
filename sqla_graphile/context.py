"""``WorkerContext``: what a task handler receives besides its payload."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .job import Job

if TYPE_CHECKING:
    from .utils import AsyncWorkerUtils, WorkerUtils

__all__ = ["CancellationSignal", "WorkerContext"]


class CancellationSignal:
    """Set when the worker wants the running job to stop (shutdown grace period over).

    Threads poll :attr:`is_set` or block in :meth:`wait`; coroutines ``await``
    :meth:`wait_async`. Async handlers are also cancelled with ``CancelledError``.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._lock = threading.Lock()

    @property
    def is_set(self) -> bool:
        """Whether cancellation was requested."""
        return self._event.is_set()

    def set(self) -> None:
        """Request cancellation (wakes every waiter, thread or coroutine)."""
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def wait(self, timeout: float | None = None) -> bool:
        """Block the calling thread until cancelled or ``timeout``; return ``is_set``."""
        return self._event.wait(timeout)

    async def wait_async(self) -> None:
        """Wait, in a coroutine, until cancellation is requested."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((loop, future))
        await future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class WorkerContext:
    """The job being run and the worker's facilities, given to every handler."""

    job: Job
    """The job row (payload, attempts, key …)."""
    worker_id: str
    """The lock id of the worker process running the job."""
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    """A logger that tags its lines with the job."""
    utils: WorkerUtils
    """Job management bound to the worker's engine (each call its own transaction)."""
    cancellation: CancellationSignal
    """Set when the worker asks the job to stop."""
    async_utils: AsyncWorkerUtils | None = None
    """Job management on the worker's async engine, for ``async def`` handlers."""
