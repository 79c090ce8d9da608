"""The worker: fetches jobs on Node graphile-worker 0.18's protocol and runs Python handlers.

:class:`Worker` holds the options and the public API; each run is a
:class:`~.run.WorkerRun` of components (fetcher, executor, outcome writer, connection
seam), described in :mod:`sqla_graphile.worker.run`. The fault model is
``docs/fault-model.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .._urls import engine_from_url, normalize_url
from ..cron import Cron, CrontabSource, load_crontab
from ..errors import (
    EventLoopAlreadyRunning,
    InvalidArgument,
    InvalidArgumentType,
    WorkerAlreadyRunning,
)
from ..hooks import Hooks
from ..recovery import WorkerRecoveryConfig
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..tasks import timeout_seconds
from ..utils import WorkerUtils
from .connection import configure_engine, worker_engine
from .fetcher import LOCAL_QUEUE_HORIZON, ForbiddenFlags
from .run import RunSettings, WorkerRun, install_signals
from .status import WorkerStatus
from .tasks import TaskRegistry
from .watchdog import DEFAULT_OVERTIME_LIMIT

__all__ = ["ForbiddenFlags", "Worker"]

logger = logging.getLogger("sqla_graphile.worker")


def _no_running_loop(method: str, twin: str) -> None:
    """Refuse a blocking run inside a running event loop, before any coroutine exists.

    ``asyncio.run`` would refuse too, but only after the coroutine was made, which then
    warns that it was never awaited.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise EventLoopAlreadyRunning(
        f"Worker.{method}() runs its own event loop and cannot be called inside a running "
        f"one; use `await worker.{twin}()` instead"
    )


class Worker:
    """Runs task handlers for jobs of a Graphile Worker schema, alongside Node workers.

    ``bind`` is an :class:`~sqlalchemy.Engine`, an
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine` or a database URL; the worker talks to the
    database through an async psycopg engine (made from the URL unless an ``AsyncEngine``
    is given) and gives handlers a :class:`WorkerUtils` on a sync engine.

    Options:

    ``concurrency``
        Jobs run at once (``def`` handlers run in as many threads).
    ``poll_interval``
        Seconds between fetches while idle; notifications wake the worker sooner.
    ``forbidden_flags``
        Flags whose jobs this worker leaves alone: a list, or a function (sync or async)
        called before each fetch. With a function, no jobs are fetched ahead of free
        slots, so each fetch uses fresh flags.
    ``hooks``
        A :class:`~sqla_graphile.hooks.Hooks` registry of observers and interceptors.
    ``local_queue_size``
        Jobs locked ahead of free slots and kept ready in memory, at most. The default,
        ``max(100, 4 × concurrency)``, is also bounded to about 0.1 s of the worker's
        recent throughput, so slow jobs are not hoarded from sibling workers and an
        urgent job waits behind little work; ``0`` fetches only for free slots.
        Unstarted jobs are returned (``attempts`` restored) on shutdown or after
        ``local_queue_ttl`` seconds; a keyed job that waited is checked before it starts.
    ``complete_batch_delay`` / ``fail_batch_delay``
        Seconds to collect outcomes before writing them in one statement. With ``0``
        outcomes still share a statement whenever they finish while a write is in flight.
    ``shutdown_grace_period``
        Seconds running jobs get to finish after a shutdown request before they are
        cancelled and failed. A graceful shutdown ends within
        ``shutdown_grace_period + 3 × statement_timeout + 1`` seconds, whatever the
        network does.
    ``statement_timeout``
        Seconds any statement of the worker may take: past it, the connection is cut and
        the statement retried on a fresh one (a silent, half-open link cannot hang the
        worker). Worker connections also get TCP keepalives.
    ``job_timeout``
        Time limit of each job (seconds or a ``timedelta``) whose task sets no
        ``timeout`` of its own; ``None`` (the default): no limit. At the limit the job is
        failed with :class:`~sqla_graphile.errors.JobTimedOut` (attempt counted, retried
        with the usual backoff); an ``async def`` handler is cancelled, a ``def`` handler
        has ``ctx.cancellation`` set. The handler keeps its slot until it returns, and
        what it returns then is not written.
    ``overtime_limit``
        Seconds (or a ``timedelta``) a ``def`` handler may run on past its job's time
        limit before it is taken for stuck (default 30 s; ``None``: never): the worker
        logs a warning, and :attr:`status <sqla_graphile.worker.Worker.status>` lists
        the job in ``stuck_jobs`` (so ``/livez`` fails) until the handler returns. Under
        ``graphile-worker run --processes`` the worker process is recycled instead (see
        :mod:`sqla_graphile.supervisor`).
    ``listen``
        Whether to LISTEN for ``jobs:insert``/``worker:migrate`` (polling alone otherwise).
    ``crontab``
        Recurring jobs: crontab text in Node's format, a crontab file (a ``Path``), or
        :class:`~sqla_graphile.cron.Cron` items. Scheduled beside Node workers sharing the
        crontab, each minute once between them. Not run by :meth:`run_once`. An item
        whose payload its typed task cannot decode raises
        :class:`~sqla_graphile.cron.CrontabError` here.
    ``recovery``
        A :class:`~sqla_graphile.recovery.WorkerRecoveryConfig`. With ``enabled`` the
        worker registers before its first fetch, heartbeats and sweeps for dead workers
        (recovering their jobs) while it runs, fences itself when its heartbeats fail
        longer than its lease, and deregisters after a clean exit. By default
        (``None``) recovery is on with the default settings wherever the schema has the
        worker registry (every schema this library migrated), else off.
    ``worker_id``
        Our lock id; unique per running worker (a fresh one is made by default). The
        worker gives back any row locked under it that it does not know of.
    """

    def __init__(
        self,
        bind: Engine | AsyncEngine | str | URL,
        tasks: Iterable[Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        concurrency: int = 10,
        poll_interval: float = 2.0,
        forbidden_flags: ForbiddenFlags | None = None,
        hooks: Hooks | None = None,
        local_queue_size: int | None = None,
        local_queue_ttl: float = 300.0,
        complete_batch_delay: float = 0.0,
        fail_batch_delay: float | None = None,
        shutdown_grace_period: float = 5.0,
        statement_timeout: float = 30.0,
        job_timeout: float | timedelta | None = None,
        overtime_limit: float | timedelta | None = DEFAULT_OVERTIME_LIMIT,
        listen: bool = True,
        worker_id: str | None = None,
        crontab: CrontabSource = None,
        recovery: WorkerRecoveryConfig | None = None,
    ) -> None:
        if not isinstance(bind, (Engine, AsyncEngine, str, URL)):
            raise InvalidArgumentType(
                f"Worker needs an Engine, AsyncEngine or database URL, not {type(bind).__name__}"
            )
        if concurrency < 1:
            raise InvalidArgument("concurrency must be at least 1")
        if poll_interval <= 0:
            raise InvalidArgument("poll_interval must be positive")
        if statement_timeout <= 0:
            raise InvalidArgument("statement_timeout must be positive")
        self.bind = bind
        self.schema = validate_schema_name(schema)
        self.tasks = TaskRegistry.build(tasks)
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.forbidden_flags = forbidden_flags
        self.hooks = hooks if hooks is not None else Hooks()
        self.local_queue_size = (
            max(100, 4 * concurrency) if local_queue_size is None else int(local_queue_size)
        )
        # The default size is also bounded by time (see the fetcher); a size given is kept.
        self._default_local_queue = local_queue_size is None
        if self.local_queue_size < 0:
            raise InvalidArgument("local_queue_size must be 0 or more")
        self.local_queue_ttl = local_queue_ttl
        self.complete_batch_delay = complete_batch_delay
        self.fail_batch_delay = (
            complete_batch_delay if fail_batch_delay is None else fail_batch_delay
        )
        self.shutdown_grace_period = shutdown_grace_period
        self.statement_timeout = statement_timeout
        self.job_timeout = timeout_seconds(job_timeout, "job_timeout")
        """Each job's time limit in seconds unless its task has one (``None``: none)."""
        self.overtime_limit = timeout_seconds(overtime_limit, "overtime_limit")
        """Seconds a ``def`` handler may run on past its time limit (``None``: no limit)."""
        # Set by the supervisor in its worker processes: a stuck handler stops the run.
        self._recycle_when_stuck = False
        self.listen = listen
        # Parsed now, so a bad crontab fails at construction with its line and field; so
        # does an item whose payload its typed task could never decode.
        self.crontab: list[Cron] = load_crontab(crontab)
        self.tasks.check_crontab(self.crontab)
        self.worker_id = worker_id or f"graphile_worker_{secrets.token_hex(9)}"
        self._worker_id_given = worker_id is not None
        """Our lock id: ``locked_by`` of every job and queue this worker holds."""
        self.recovery = recovery
        quiet_off = (
            recovery is None or recovery.enabled or recovery == WorkerRecoveryConfig(enabled=False)
        )
        if not quiet_off:
            logger.warning("recovery settings were given with enabled=False: recovery is off")
        self._sync_engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._owns_sync_engine = False
        self._utils: WorkerUtils | None = None
        self._runtime: WorkerRun | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def task_identifiers(self) -> frozenset[str]:
        """The identifiers of the tasks this worker runs."""
        return frozenset(self.tasks)

    @property
    def listening(self) -> bool:
        """Whether the worker's LISTEN connection is established right now."""
        runtime = self._runtime
        return bool(runtime and runtime.listener and runtime.listener.listening)

    @property
    def running(self) -> bool:
        """Whether the worker has started (past its checks) and not yet stopped."""
        runtime = self._runtime
        return runtime is not None and runtime.started

    @property
    def fenced(self) -> bool:
        """Whether the worker is fenced: its heartbeats failed for longer than its lease."""
        runtime = self._runtime
        return bool(runtime and runtime.fenced)

    @property
    def status(self) -> WorkerStatus:
        """A snapshot of the worker's health, for probes and supervisors (any thread).

        See :class:`~sqla_graphile.health.WorkerStatus`: whether it runs, is shutting
        down, listens, reaches the database, heartbeats, is fenced, or has a handler
        thread stuck past its time limit.
        """
        runtime = self._runtime
        if runtime is None:
            return WorkerStatus(
                self.worker_id,
                running=False,
                stopping=False,
                listen=self.listen,
                listening=False,
                fenced=False,
                recovery=False,
                connected=False,
            )
        agent = runtime.recovery
        config = agent.config if agent is not None else None
        return WorkerStatus(
            self.worker_id,
            running=runtime.started,
            stopping=runtime.stopping,
            listen=self.listen and not runtime.once,
            listening=bool(runtime.listener and runtime.listener.listening),
            fenced=runtime.fenced,
            recovery=agent is not None,
            connected=runtime.started and not runtime.db.failing,
            heartbeat_age=agent.heartbeat_age if agent is not None else None,
            heartbeat_interval=(
                config.heartbeat_interval.total_seconds() if config is not None else None
            ),
            stuck_jobs=runtime.watchdog.stuck_jobs if runtime.watchdog is not None else (),
            idle=runtime.started and not runtime.stopping and runtime.fetcher.idle(),
            fetch_session=runtime.fetcher.connection.backend_pid(),
        )

    def create_utils(self) -> WorkerUtils:
        """A :class:`WorkerUtils` with this worker's hooks and task identifiers.

        Its ``cleanup(GC_TASK_IDENTIFIERS)`` keeps the identifiers of this worker's tasks.
        """
        if self._utils is None:
            self._utils = WorkerUtils(
                self._sync(),
                self.schema,
                hooks=self.hooks,
                known_identifiers=self.task_identifiers,
            )
        return self._utils

    def run(self) -> None:
        """Work until SIGINT/SIGTERM (or :meth:`request_shutdown`); blocks.

        The first signal shuts down gracefully, a second forces the shutdown. Every
        completion and failure is written before this returns. It runs an event loop of
        its own: inside a running loop (an async application, a notebook) it raises
        :class:`~sqla_graphile.errors.EventLoopAlreadyRunning`; use :meth:`run_async`.
        """
        _no_running_loop("run", "run_async")
        asyncio.run(self._main(once=False, handle_signals=True, private_engine=True))

    def run_once(self) -> None:
        """Work until no job is runnable (running jobs' outcomes included), then return.

        Like :meth:`run` it blocks in an event loop of its own: inside a running loop use
        :meth:`run_once_async`.
        """
        _no_running_loop("run_once", "run_once_async")
        asyncio.run(self._main(once=True, handle_signals=True, private_engine=True))

    async def run_async(self) -> None:
        """:meth:`run` for an application's event loop (no signal handling).

        Stop it with :meth:`request_shutdown` or by cancelling the task, which shuts
        down gracefully before the cancellation propagates.
        """
        await self._main(once=False, handle_signals=False, private_engine=False)

    async def run_once_async(self) -> None:
        """:meth:`run_once` for an application's event loop."""
        await self._main(once=True, handle_signals=False, private_engine=False)

    def request_shutdown(self, *, force: bool = False, reason: str = "graceful") -> None:
        """Ask the running worker to stop (from any thread); ``force`` skips the grace."""
        runtime = self._runtime
        if runtime is None:
            return
        runtime.loop.call_soon_threadsafe(runtime.request_stop, reason, force)

    def close(self) -> None:
        """Dispose of the sync engine the worker created from a URL (nothing otherwise)."""
        if self._owns_sync_engine and self._sync_engine is not None:
            self._sync_engine.dispose()

    # -- engines ----------------------------------------------------------------------

    def _url(self) -> URL:
        bind = self.bind
        if isinstance(bind, (Engine, AsyncEngine)):
            return bind.url
        return normalize_url(bind) if isinstance(bind, str) else bind

    def _sync(self) -> Engine:
        if self._sync_engine is None:
            url = self._url()
            if isinstance(self.bind, AsyncEngine):
                url = url.set(drivername="postgresql+psycopg")
            self._sync_engine = engine_from_url(url)
            self._owns_sync_engine = True
        return self._sync_engine

    def _async_engine(self, private: bool) -> tuple[AsyncEngine, bool]:
        bind = self.bind if isinstance(self.bind, AsyncEngine) else self._url()
        return worker_engine(bind, private, self.concurrency, self.statement_timeout)

    # -- the run ----------------------------------------------------------------------

    async def _main(self, *, once: bool, handle_signals: bool, private_engine: bool) -> None:
        if self._runtime is not None:
            raise WorkerAlreadyRunning("this worker is already running")
        engine, owned = self._async_engine(private_engine)
        configure_engine(engine, self.statement_timeout)
        runtime = WorkerRun(self._settings(), engine, once=once)
        self._runtime = runtime
        try:
            async with contextlib.AsyncExitStack() as stack:
                if owned:
                    stack.push_async_callback(engine.dispose)
                if handle_signals:
                    stack.callback(install_signals(runtime))
                await runtime.run(stack)
        finally:
            self._runtime = None

    def _settings(self) -> RunSettings:
        return RunSettings(
            schema=self.schema,
            tasks=self.tasks,
            worker_id=self.worker_id,
            concurrency=self.concurrency,
            poll_interval=self.poll_interval,
            forbidden_flags=self.forbidden_flags,
            hooks=self.hooks,
            local_queue_size=self.local_queue_size,
            local_queue_horizon=LOCAL_QUEUE_HORIZON if self._default_local_queue else None,
            local_queue_ttl=self.local_queue_ttl,
            complete_batch_delay=self.complete_batch_delay,
            fail_batch_delay=self.fail_batch_delay,
            shutdown_grace_period=self.shutdown_grace_period,
            statement_timeout=self.statement_timeout,
            job_timeout=self.job_timeout,
            overtime_limit=self.overtime_limit,
            recycle_when_stuck=self._recycle_when_stuck,
            listen=self.listen,
            crontab=self.crontab,
            recovery=self.recovery,
            reclaim_at_start=self._worker_id_given,
            utils=self.create_utils(),
        )
