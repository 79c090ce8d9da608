"""``WorkerContext``: what a task handler receives besides its payload."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from .cron import CronInfo
from .job import Job

if TYPE_CHECKING:
    from .utils import AsyncWorkerUtils, WorkerUtils

__all__ = ["CancellationSignal", "WorkerContext"]


class CancellationSignal:
    """Set when the worker wants the running job to stop (shutdown, fence, time limit).

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


class _JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with the job and carries it in ``extra`` for structured logs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[job {extra['job_id']} {extra['task_identifier']}] {msg}", kwargs


_JOB_LOGGER = logging.getLogger("sqla_graphile.worker.job")


class WorkerContext:
    """The job being run and the worker's facilities, given to every handler.

    ``logger`` defaults to one tagging its lines with the job, made when first used.
    """

    __slots__ = ("_logger", "async_utils", "cancellation", "job", "utils", "worker_id")

    job: Job
    """The job row (payload, attempts, key …)."""
    worker_id: str
    """The lock id of the worker process running the job."""
    utils: WorkerUtils
    """Job management bound to the worker's engine (each call its own transaction)."""
    cancellation: CancellationSignal
    """Set when the worker asks the job to stop (shutdown, fence, or its time limit)."""
    async_utils: AsyncWorkerUtils | None
    """Job management on the worker's async engine, for ``async def`` handlers."""

    def __init__(
        self,
        job: Job,
        worker_id: str,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None,
        utils: WorkerUtils,
        cancellation: CancellationSignal,
        async_utils: AsyncWorkerUtils | None = None,
    ) -> None:
        self.job = job
        self.worker_id = worker_id
        self._logger = logger
        self.utils = utils
        self.cancellation = cancellation
        self.async_utils = async_utils

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
        """A logger that tags its lines with the job (``sqla_graphile.worker.job``)."""
        logger = self._logger
        if logger is None:
            job = self.job
            # Made on first use: most jobs never log, and a worker runs thousands a second.
            logger = self._logger = _JobLogger(
                _JOB_LOGGER,
                {
                    "job_id": job.id,
                    "task_identifier": job.task_identifier,
                    "attempt": job.attempts,
                    "worker_id": self.worker_id,
                },
            )
        return logger

    @property
    def cron(self) -> CronInfo | None:
        """The minute a crontab scheduled this job for, or ``None`` if no crontab added it.

        Read from the ``_cron`` stamp of the job's payload (``ctx.cron.ts``,
        ``ctx.cron.backfilled``), for jobs of Python's and of Node's cron alike. Typed
        tasks' payloads never hold the stamp: the worker removes it before decoding.
        """
        return CronInfo.from_payload(self.job.payload)

    def __repr__(self) -> str:
        return f"WorkerContext(job={self.job!r}, worker_id={self.worker_id!r})"
