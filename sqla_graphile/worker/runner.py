"""The worker: fetches jobs on Node graphile-worker 0.18's protocol and runs Python handlers.

One asyncio event loop drives everything: a fetcher that fills a local queue with jobs
locked in batches, up to ``concurrency`` running jobs (``async def`` handlers on the loop,
``def`` handlers in threads), two writers that send completions and failures in batches,
the LISTEN connection, and Node's 4-hour stale-lock sweep. The fetcher and the writers
each keep a pooled connection for the worker's life, so a statement costs one round trip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import json.scanner
import logging
import operator
import os
import random
import secrets
import signal
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from .._urls import engine_from_url, normalize_url
from ..context import CancellationSignal, WorkerContext
from ..cron import Cron, CronScheduler, CrontabSource, load_crontab
from ..errors import SchemaNotMigrated, sqlstate_of, translate_db_error
from ..hooks import (
    UNCHANGED,
    AfterJobRunContext,
    BeforeJobRunContext,
    Continue,
    Fail,
    Hooks,
    JobCompleteEvent,
    JobEvent,
    JobFailEvent,
    JobLockLostEvent,
    Skip,
    WorkerStartEvent,
    WorkerStopEvent,
)
from ..job import Job
from ..migrations import check_database
from ..recovery import WorkerRecoveryConfig
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..utils import AsyncWorkerUtils, WorkerUtils
from ._threads import HandlerThreads
from .listener import NotificationListener
from .quick import QuickFetch
from .recovery import RecoveryAgent
from .sql import WorkerStatements, worker_statements
from .tasks import BatchFailure, BatchJobError, TaskRegistry, WorkerTask, batch_outcome

__all__ = ["ForbiddenFlags", "Worker"]

logger = logging.getLogger("sqla_graphile.worker")
_T = TypeVar("_T")

#: ``forbidden_flags``: a list, or a function (sync or async) called before each fetch.
ForbiddenFlags = (
    Sequence[str] | Callable[[], "Sequence[str] | Awaitable[Sequence[str] | None] | None"]
)

# SQLSTATEs worth another try: serialisation failure, deadlock, the server starting up or
# shutting down, too many connections, and lost connections.
_TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "57P01", "57P02", "57P03", "53300", "08000", "08001", "08003", "08006"}
)
# Node's stale-lock sweep: first after a random 0–60 s, then every random 8–10 min.
_FIRST_SWEEP_MAX = 60.0
_SWEEP_INTERVAL = (480.0, 600.0)
# With only ``def`` handlers, jobs handed to the threads at once, per unit of concurrency.
_AHEAD = 4
# Largest number of outcomes sent in one statement.
_MAX_WRITE_BATCH = 2000
# Characters of traceback kept in last_error after the message.
_TRACEBACK_CHARS = 1500


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (PoolTimeoutError, OSError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = sqlstate_of(exc)
        if state is None:
            # No SQLSTATE: the connection broke before the server answered.
            return type(exc.orig).__name__ in ("OperationalError", "InterfaceError")
        return state in _TRANSIENT_SQLSTATES
    return False


def _describe(exc: BaseException) -> str:
    """``last_error`` for an exception: its concise message, then a trimmed traceback."""
    message = str(exc).strip() or type(exc).__name__
    head = f"{type(exc).__name__}: {message}"
    # The worker's own frames (and asyncio's) say nothing about the failure.
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(_OWN_FILES)
    ]
    if not frames:
        return head
    tail = "".join(traceback.format_list(frames[-4:]))
    if len(tail) > _TRACEBACK_CHARS:
        tail = "…" + tail[-_TRACEBACK_CHARS:]
    return f"{head}\n{tail.rstrip()}"


_OWN_FILES = (os.path.dirname(__file__), os.path.dirname(asyncio.__file__))


class _HookFailure(Exception):
    """A job failed by an interceptor's ``Fail(message)``."""


class _ShutdownFailure(Exception):
    """A job interrupted by the worker's shutdown."""


@dataclass(slots=True)
class _Running:
    job: Job
    started: float
    fetched: float
    task: asyncio.Task[None] | None = None
    handler: asyncio.Task[Any] | None = None
    """The ``async def`` handler's own task, cancelled at the end of the grace period."""
    abandoned: bool = False
    """Failed by the shutdown while still running: its outcome is not written."""


@dataclass(slots=True)
class _Completion:
    job: Job
    duration: float


@dataclass(slots=True)
class _Failure:
    job: Job
    message: str
    exception: BaseException | None
    duration: float
    payload: Any = UNCHANGED


class _Writer(Generic[_T]):
    """Collects outcomes and writes them in batches, one statement in flight at a time.

    While a statement runs, new outcomes accumulate and go together in the next one; a
    ``delay`` widens that window. :meth:`close` returns once everything is written.
    """

    def __init__(self, delay: float, write: Callable[[list[_T]], Awaitable[None]]) -> None:
        self._delay = delay
        self._write = write
        self._items: list[_T] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task = asyncio.create_task(self._loop(), name="sqla_graphile-writer")

    def add(self, item: _T) -> None:
        self._items.append(item)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._delay > 0 and not self._closed:
                await asyncio.sleep(self._delay)
            self._wake.clear()
            while self._items:
                batch = self._items[:_MAX_WRITE_BATCH]
                del self._items[:_MAX_WRITE_BATCH]
                try:
                    await self._write(batch)
                except Exception:  # the write logs its own errors; this is a bug
                    logger.exception("writing %d outcome(s) failed", len(batch))
            self._idle.set()
            if self._closed:
                return


class _Compiled:
    """A worker statement compiled once for the held connection's driver."""

    __slots__ = ("defaults", "names", "processors", "sql")

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        # Literal values SQLAlchemy turned into parameters of their own.
        self.defaults = {
            key: value
            for key, value in compiled.construct_params(_check=False).items()
            if value is not None
        }
        self.processors = {k: v for k, v in compiled._bind_processors.items() if v is not None}
        self.names: list[str] | None = None
        """The result's column names, read from the first result's description."""

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        params = dict(self.defaults)
        processors = self.processors
        for key, value in values.items():
            process = processors.get(key)
            params[key] = value if process is None or value is None else process(value)
        return params


class _HeldConnection:
    """A connection of the worker's pool kept for one role: the fetcher or a writer.

    At thousands of jobs a second, a pool checkout and SQLAlchemy's execution machinery
    cost more than the statement itself; held, the psycopg connection also prepares
    each statement server-side after a few runs. Statements are the same Core objects,
    compiled once. A failed connection is invalidated and replaced on the next call;
    errors are raised wrapped as SQLAlchemy's, like the pooled path's. With another
    driver than psycopg, :attr:`usable` turns false and callers use the pool.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._raw: psycopg.AsyncConnection[Any] | None = None
        self._cursor: psycopg.AsyncCursor[Any] | None = None
        self._compiled: dict[int, _Compiled] = {}
        self._lock = asyncio.Lock()
        self.usable = True

    async def run(
        self, statement: Any, params: dict[str, Any], *, tuples: bool = False
    ) -> list[Any]:
        """The statement's rows, as dicts; with ``tuples``, as tuples in binary format."""
        async with self._lock:
            raw = self._raw if self._raw is not None else await self._connect()
            cursor = self._cursor
            if raw is None or cursor is None:
                raise _NotHeldError
            compiled = self._compiled.get(id(statement))
            if compiled is None:
                compiled = self._compiled[id(statement)] = _Compiled(
                    statement, self._engine.dialect
                )
            try:
                # Binary results load faster (timestamps above all); every column a
                # tuple-reading caller takes loads to the same value either way.
                await cursor.execute(compiled.sql, compiled.params(params), binary=tuples)
                if tuples:
                    return await cursor.fetchall()
                names = compiled.names
                if names is None:
                    if cursor.description is None:
                        return []
                    names = compiled.names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
            except psycopg.Error as exc:
                broken = raw.broken or raw.closed
                if broken:
                    await self.release(invalidate=True)
                raise DBAPIError.instance(
                    compiled.sql,
                    params,
                    exc,
                    psycopg.Error,
                    connection_invalidated=broken,
                    dialect=self._engine.dialect,
                ) from exc
            except BaseException:
                # Cancelled mid-statement: the session's state is unknown.
                await self.release(invalidate=True)
                raise

    async def _connect(self) -> psycopg.AsyncConnection[Any] | None:
        connection = await self._engine.connect()
        try:
            raw = (await connection.get_raw_connection()).driver_connection
        except BaseException:
            await connection.close()
            raise
        if not isinstance(raw, psycopg.AsyncConnection) or not raw.autocommit:
            self.usable = False
            await connection.close()
            return None
        self._connection, self._raw, self._cursor = connection, raw, raw.cursor()
        return raw

    @property
    def raw(self) -> psycopg.AsyncConnection[Any] | None:
        """The psycopg connection held right now (``None`` between connections)."""
        return self._raw if self.usable else None

    async def release(self, *, invalidate: bool = False) -> None:
        connection, self._connection, self._raw = self._connection, None, None
        self._cursor = None
        if connection is None:
            return
        try:
            if invalidate:
                await connection.invalidate()
            await connection.close()
        except Exception:  # a broken connection may fail to close; it is gone either way
            logger.debug("error releasing a worker connection", exc_info=True)


class _NotHeldError(Exception):
    """The engine's driver is not psycopg: use a pooled connection instead."""


def _pool_has_room(engine: AsyncEngine, held: int) -> bool:
    """Whether ``engine``'s pool can lend ``held`` connections for good and still serve.

    Two more are left for the sweep, returns and handlers' async utilities.
    """
    pool = engine.sync_engine.pool
    if isinstance(pool, NullPool):
        return True
    if isinstance(pool, QueuePool):
        max_overflow = getattr(pool, "_max_overflow", 0)  # not exposed publicly
        return max_overflow < 0 or pool.size() + max_overflow >= held + 2
    return False


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
        Jobs locked per fetch and kept ready in memory; ``0`` fetches only for free
        slots. Unstarted jobs are returned (``attempts`` restored) on shutdown or after
        ``local_queue_ttl`` seconds.
    ``complete_batch_delay`` / ``fail_batch_delay``
        Seconds to collect outcomes before writing them in one statement. With ``0``
        outcomes still share a statement whenever they finish while a write is in flight.
    ``shutdown_grace_period``
        Seconds running jobs get to finish after a shutdown request before they are
        cancelled and failed.
    ``listen``
        Whether to LISTEN for ``jobs:insert``/``worker:migrate`` (polling alone otherwise).
    ``crontab``
        Recurring jobs: crontab text in Node's format, a crontab file (a ``Path``), or
        :class:`~sqla_graphile.cron.Cron` items. Scheduled beside Node workers sharing the
        crontab, each minute once between them. Not run by :meth:`run_once`.
    ``recovery``
        A :class:`~sqla_graphile.recovery.WorkerRecoveryConfig`. With ``enabled`` the
        worker registers before its first fetch, heartbeats and sweeps for dead workers
        (recovering their jobs) while it runs, and deregisters after a clean exit.
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
        listen: bool = True,
        worker_id: str | None = None,
        crontab: CrontabSource = None,
        recovery: WorkerRecoveryConfig | None = None,
    ) -> None:
        if not isinstance(bind, (Engine, AsyncEngine, str, URL)):
            raise TypeError(
                f"Worker needs an Engine, AsyncEngine or database URL, not {type(bind).__name__}"
            )
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
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
        if self.local_queue_size < 0:
            raise ValueError("local_queue_size must be 0 or more")
        self.local_queue_ttl = local_queue_ttl
        self.complete_batch_delay = complete_batch_delay
        self.fail_batch_delay = (
            complete_batch_delay if fail_batch_delay is None else fail_batch_delay
        )
        self.shutdown_grace_period = shutdown_grace_period
        self.listen = listen
        # Parsed now, so a bad crontab fails at construction with its line and field.
        self.crontab: list[Cron] = load_crontab(crontab)
        self.worker_id = worker_id or f"graphile_worker_{secrets.token_hex(9)}"
        """Our lock id: ``locked_by`` of every job and queue this worker holds."""
        self.recovery = recovery
        if recovery is not None and not recovery.enabled and recovery != WorkerRecoveryConfig():
            logger.warning("recovery settings were given with enabled=False: recovery is off")
        self._sync_engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._owns_sync_engine = False
        self._utils: WorkerUtils | None = None
        self._runtime: _Runtime | None = None

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
        completion and failure is written before this returns.
        """
        asyncio.run(self._main(once=False, handle_signals=True, private_engine=True))

    def run_once(self) -> None:
        """Work until no job is runnable (running jobs' outcomes included), then return."""
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
        bind = self.bind
        if isinstance(bind, AsyncEngine) and not private:
            return bind, False
        url = make_url(self._url()) if not isinstance(bind, AsyncEngine) else bind.url
        if not isinstance(bind, AsyncEngine):
            url = url.set(drivername="postgresql+psycopg_async")
        # Enough connections for the fetcher, both writers, the sweep and handlers'
        # async utils, without ever waiting on the pool for a write.
        # With recovery, two more: the heartbeat and the recovery sweep.
        extra = 2 if self.recovery is not None and self.recovery.enabled else 0
        return create_async_engine(url, pool_size=5 + extra, max_overflow=self.concurrency), True

    def _listen_kwargs(self, engine: AsyncEngine) -> dict[str, Any]:
        url = engine.url.set(drivername="postgresql+psycopg_async")
        dialect = create_async_engine(url).dialect  # parses only, never connects
        _args, kwargs = dialect.create_connect_args(url)
        kwargs.pop("context", None)
        kwargs.setdefault("application_name", "sqla_graphile listener")
        return dict(kwargs)

    # -- the run ----------------------------------------------------------------------

    async def _main(self, *, once: bool, handle_signals: bool, private_engine: bool) -> None:
        if self._runtime is not None:
            raise RuntimeError("this worker is already running")
        engine, owned = self._async_engine(private_engine)
        runtime = _Runtime(self, engine, once=once)
        self._runtime = runtime
        installed: list[signal.Signals] = []
        try:
            if handle_signals:
                installed = _install_signals(runtime)
            await runtime.run()
        finally:
            if runtime.recovery is not None:
                # After a failed start or shutdown: stop the loops but keep the row; it
                # goes stale and a sweep recovers whatever this worker still holds.
                await runtime.recovery.stop(deregister=False)
            for sig in installed:
                runtime.loop.remove_signal_handler(sig)
            self._runtime = None
            await runtime.release_connections()  # also when the shutdown did not finish
            if owned:
                await engine.dispose()


def _install_signals(runtime: _Runtime) -> list[signal.Signals]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            runtime.loop.add_signal_handler(sig, runtime.on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            logger.debug("cannot handle %s here; stop the worker with request_shutdown", sig)
            continue
        installed.append(sig)
    return installed


class _Runtime:
    """The state of one run of a :class:`Worker`."""

    def __init__(self, worker: Worker, engine: AsyncEngine, *, once: bool) -> None:
        self.worker = worker
        self.once = once
        self.loop = asyncio.get_running_loop()
        self.base_engine = engine
        # Every worker statement is a single autocommit statement, as Node's are.
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.sql: WorkerStatements = worker_statements(worker.schema)
        self.worker_id = worker.worker_id
        self.identifiers = sorted(worker.tasks)
        self.task_names: dict[int, str] = {}
        """Our tasks' ids (as last looked up) and their identifiers."""
        self.task_ids: list[int] = []
        self.tasks_checked = 0.0
        self.notified = 0
        """Jobs announced by ``jobs:insert`` since the last fetch began."""
        self.fetch_when_one_ends = False
        self.quick: QuickFetch | None = None
        self.fetch_waiting = False
        """Whether the fetch task is parked, idle, leaving its connection to a quick fetch."""
        self.tasks_suspect = False
        """Whether a quick fetch came back empty: the fetch task looks up the task ids."""
        self.hooks = worker.hooks
        self.cancellation = CancellationSignal()
        self.local: deque[tuple[Job, float]] = deque()
        self.running: dict[int, _Running] = {}
        self.listener: NotificationListener | None = None
        self.stopping = False
        self.forced = False
        self.stop_reason = "graceful"
        self.error: BaseException | None = None
        self.stop_event = asyncio.Event()
        self.force_event = asyncio.Event()
        self.nudge = _Flag()
        self.demand = asyncio.Event()
        """Set whenever a running job ends (and on stop)."""
        self.refill = _Flag()
        """Set when the fetcher should look at the local queue again (and on stop)."""
        self.ttl_expired = False
        self.writes_done = 0
        self.signals = 0
        self.force_message = "Forced worker shutdown"
        self.prefetch = worker.local_queue_size > 0 and not callable(worker.forbidden_flags)
        self.all_sync = not any(entry.is_async for entry in worker.tasks.values())
        self.any_sync = not all(entry.is_async for entry in worker.tasks.values())
        # Payloads are fetched as text and decoded here, as the engine would decode JSON.
        self.loads: Callable[[str], Any] = (
            getattr(engine.dialect, "_json_deserializer", None) or _json_loads
        )
        self._background: list[asyncio.Task[None]] = []
        self._returns: list[asyncio.Task[None]] = []
        recovery = worker.recovery
        self.recovery: RecoveryAgent | None = (
            RecoveryAgent(
                engine,
                worker.schema,
                worker.worker_id,
                recovery,
                task_identifiers=worker.task_identifiers,
                hooks=worker.hooks,
            )
            if recovery is not None and recovery.enabled
            else None
        )
        # The fetcher and each writer keep a connection: no pool checkout per statement
        # (unless the pool is too small to spare them).
        held = [_HeldConnection(self.engine) for _ in range(3)]
        for connection in held if not _pool_has_room(engine, len(held)) else ():
            connection.usable = False
        self.fetch_connection, self.complete_connection, self.fail_connection = held

    # -- control ----------------------------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals == 1:
            logger.info("%s received: shutting down gracefully (again to force)", sig.name)
            self.request_stop("graceful", False)
        else:
            logger.warning("%s received again: forcing the shutdown", sig.name)
            self.request_stop(f"forced by {sig.name}", True)

    def request_stop(self, reason: str, force: bool) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_reason = "forced" if force else reason
        if force:
            self.forced = True
            self.stop_reason = "forced"
            self.force_message = f"Forced worker shutdown ({reason})"
            self.force_event.set()
        self.stop_event.set()
        self.nudge.set()
        self.demand.set()
        self.refill.set()

    def on_insert(self, count: int) -> None:
        self.notified += count
        quick = self.quick
        if (
            quick is not None
            and self.fetch_waiting
            and not (self.running or self.local or self.stopping)
            and not self.hooks.has("job_fetch")  # an async observer needs the fetch task
            and quick.start({"worker_id": self.worker_id, "task_ids": self.task_ids})
        ):
            self.notified = 0
            return
        self.nudge.set()

    def on_migrate(self, data: dict[str, Any]) -> None:
        if data.get("breaking") is True:
            logger.warning(
                "a breaking migration (%s) was applied to the worker schema; stopping",
                data.get("migrationNumber"),
            )
            self.request_stop("migrate", False)
        else:
            logger.info("the worker schema was migrated (%s)", data.get("migrationNumber"))

    # -- database ---------------------------------------------------------------------

    async def execute(
        self,
        statement: Any,
        params: dict[str, Any],
        *,
        what: str,
        retries: int = 100,
        retry_any: bool = False,
        held: _HeldConnection | None = None,
        tuples: bool = False,
    ) -> list[Any]:
        """Run one autocommit statement and return its rows, retrying transient errors.

        ``held``: run it on that connection rather than on one checked out of the pool.
        The rows are mappings, or with ``tuples`` positional rows.
        """
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                if held is not None and held.usable:
                    with contextlib.suppress(_NotHeldError):
                        return await held.run(statement, params, tuples=tuples)
                async with self.engine.connect() as connection:
                    result = await connection.execute(statement, params)
                    if not result.returns_rows:
                        return []
                    return list(result.all() if tuples else result.mappings().all())
            except (DBAPIError, PoolTimeoutError, OSError) as exc:
                if attempt >= retries or not (retry_any or _is_transient(exc)):
                    if isinstance(exc, DBAPIError):
                        translated = translate_db_error(exc, schema=self.worker.schema)
                        if translated is not None:
                            raise translated from exc
                    raise
                logger.warning(
                    "%s failed (attempt %d, retrying in %.2f s): %s",
                    what,
                    attempt,
                    delay,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 1.5, 5.0 if retry_any else 30.0)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        interrupted: BaseException | None = None
        try:
            await self.stop_event.wait()
        except asyncio.CancelledError as exc:
            # The application cancelled us: shut down gracefully, then let it through.
            interrupted = exc
            self.request_stop("cancelled", False)
        try:
            await asyncio.shield(self.shutdown())
        except asyncio.CancelledError as exc:
            interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error

    async def start(self) -> None:
        async with self.base_engine.connect() as connection:
            ledger = await connection.run_sync(lambda c: check_database(c, self.worker.schema))
        if not ledger.table_exists:
            raise SchemaNotMigrated(self.worker.schema)
        await self.execute(
            self.sql.register_tasks, {"identifiers": self.identifiers}, what="registering tasks"
        )
        await self.look_up_tasks()
        if self.recovery is not None:
            # Before any fetch: every lock of ours must belong to a registered worker.
            await self.recovery.register()
        if self.once:
            await self.sweep()
        self.threads = HandlerThreads(self.worker.concurrency, "sqla_graphile-handler")
        self.utils = self.worker.create_utils()
        self.async_utils = AsyncWorkerUtils(
            self.base_engine,
            self.worker.schema,
            hooks=self.hooks,
            known_identifiers=self.worker.task_identifiers,
        )
        self.completer = _Writer[_Completion](
            self.worker.complete_batch_delay, self.write_completions
        )
        self.failer = _Writer[_Failure](self.worker.fail_batch_delay, self.write_failures)
        logger.info(
            "worker %s started: %d task(s), concurrency %d, schema %r%s",
            self.worker_id,
            len(self.identifiers),
            self.worker.concurrency,
            self.worker.schema,
            " (run once)" if self.once else "",
        )
        await self.emit(
            "worker_start",
            lambda: WorkerStartEvent(
                self.worker_id,
                self.worker.schema,
                self.worker.concurrency,
                self.worker.task_identifiers,
            ),
        )
        if self.worker.listen and not self.once:
            self.listener = NotificationListener(
                self.worker._listen_kwargs(self.base_engine),
                on_insert=self.on_insert,
                on_migrate=self.on_migrate,
                on_connect=self.nudge.set,
            )
            self._background.append(asyncio.create_task(self.listener.run(), name="listener"))
            if self.worker.forbidden_flags is None:
                self.quick = QuickFetch(
                    self.sql.fetch_one, on_rows=self.quick_rows, on_fallback=self.quick_fallback
                )
        if not self.once:
            self._background.append(asyncio.create_task(self.sweep_loop(), name="sweep"))
        if self.worker.crontab and not self.once:
            scheduler = CronScheduler(
                self.base_engine, self.worker.crontab, schema=self.worker.schema, hooks=self.hooks
            )
            # Cancelled with the other background tasks at shutdown; a minute being
            # claimed then rolls back and is claimed again by whoever runs next.
            self._background.append(
                asyncio.create_task(scheduler.run(asyncio.Event()), name="cron")
            )
        if self.recovery is not None:
            self.recovery.start()
        self.fetcher = asyncio.create_task(self.fetch_loop(), name="sqla_graphile-fetcher")

    async def shutdown(self) -> None:
        reason = self.stop_reason
        # 1. Stop fetching; a fetch in flight is awaited, never cancelled (its jobs
        #    would stay locked by us for 4 hours).
        try:
            await asyncio.wait_for(asyncio.shield(self.fetcher), timeout=30.0)
        except asyncio.TimeoutError:
            logger.error("the fetcher did not stop in 30 s; cancelling it")
            self.fetcher.cancel()
        except Exception:  # its error was logged and recorded by fetch_loop
            pass
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # 2. Jobs fetched but never started go back, attempts restored.
        await self.return_local_jobs()
        await asyncio.gather(*self._returns)
        # 3. Running jobs get the grace period (none after a forced stop).
        if self.running and not self.forced:
            await self.wait_running(self.worker.shutdown_grace_period)
        # 4. Then they are asked to stop, async handlers cancelled, and what still runs
        #    is failed in one statement.
        if self.running:
            self.cancellation.set()
            for record in self.running.values():
                if record.handler is not None:
                    record.handler.cancel()
            if not self.forced:
                await self.wait_running(min(1.0, self.worker.shutdown_grace_period))
        if self.running:
            await self.fail_abandoned()
        # 5. Every outcome is written before we return.
        await self.completer.close()
        await self.failer.close()
        self.threads.shutdown()
        await self.release_connections()
        if self.recovery is not None:
            # Heartbeats went on through the grace period; every outcome is written now.
            await self.recovery.stop()
        if self.forced:
            reason = "forced"
        logger.info("worker %s stopped (%s)", self.worker_id, reason)
        await self.emit("worker_stop", lambda: WorkerStopEvent(self.worker_id, reason, self.error))

    async def release_connections(self) -> None:
        for held in (self.fetch_connection, self.complete_connection, self.fail_connection):
            await held.release()

    async def wait_running(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.running and not self.force_event.is_set():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            self.demand.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    _first(self.demand.wait(), self.force_event.wait()), remaining
                )

    async def fail_abandoned(self) -> None:
        records = list(self.running.values())
        for record in records:
            record.abandoned = True
        if self.forced:
            message = self.force_message
        else:
            message = (
                "Worker shutdown: job still running after the "
                f"{self.worker.shutdown_grace_period:g} s grace period"
            )
        now = time.monotonic()
        failures = [
            _Failure(r.job, message, _ShutdownFailure(message), now - r.started) for r in records
        ]
        logger.warning(
            "failing %d job(s) still running at shutdown: %s",
            len(failures),
            ", ".join(str(r.job.id) for r in records),
        )
        await self.write_failures(failures)
        for record in records:
            if record.task is not None:
                record.task.cancel()
        self.running.clear()

    async def emit(self, event: str, build: Callable[[], Any]) -> None:
        if self.hooks.has(event):
            await self.hooks.emit(event, build())

    # -- fetching ---------------------------------------------------------------------

    def fetch_size(self) -> int:
        free = self.worker.concurrency - len(self.running)
        queued = len(self.local)
        needed = max(0, free - queued)
        if not self.prefetch or self.ttl_expired:
            return needed
        size = self.worker.local_queue_size
        if needed > 0 or queued <= size // 2:
            return max(needed, size - queued)
        return 0

    async def forbidden(self) -> list[str] | None:
        flags = self.worker.forbidden_flags
        if flags is None:
            return None
        if callable(flags):
            value = flags()
            if inspect.isawaitable(value):
                value = await value
            flags = value
        if flags is None:
            return None
        if isinstance(flags, str):
            raise TypeError("forbidden_flags must be a list of flags, not a string")
        listed = [str(flag) for flag in flags]
        return listed or None

    async def look_up_tasks(self) -> bool:
        """Read our tasks' ids afresh; whether they changed since the last look."""
        rows = await self.execute(
            self.sql.task_ids,
            {"identifiers": self.identifiers},
            what="looking up task ids",
            held=self.fetch_connection,
        )
        self.tasks_checked = time.monotonic()
        names = {row["id"]: row["identifier"] for row in rows}
        if names == self.task_names:
            return False
        if self.task_names:
            logger.info("task ids changed (task rows were garbage-collected); fetching anew")
        self.task_names = names
        self.task_ids = list(names)
        return True

    async def tasks_changed(self) -> bool:
        """:meth:`look_up_tasks`, its failure logged and taken for "no change"."""
        try:
            return await self.look_up_tasks()
        except Exception as exc:
            if not _is_transient(exc):
                logger.exception("looking up task ids failed")
            return False

    async def fetch(self, limit: int) -> list[Job]:
        flags = await self.forbidden()
        params: dict[str, Any] = {"worker_id": self.worker_id, "task_ids": self.task_ids}
        if limit == 1:
            statement = self.sql.fetch_one if flags is None else self.sql.fetch_one_with_flags
        else:
            statement = self.sql.fetch if flags is None else self.sql.fetch_with_flags
            params["limit"] = limit
        if flags is not None:
            params["forbidden"] = flags
        rows = await self.execute(
            statement, params, what="fetching jobs", held=self.fetch_connection, tuples=True
        )
        jobs = self.jobs_of(rows)
        if jobs and self.hooks.has("job_fetch"):
            for job in jobs:
                await self.hooks.emit("job_fetch", JobEvent(job, self.worker_id))
        return jobs

    def jobs_of(self, rows: Sequence[Sequence[Any]]) -> list[Job]:
        """The jobs of a fetch's rows (columns as in ``FETCHED``), in start order."""
        names = self.task_names
        loads = self.loads
        # Positional: thousands of jobs a second are built here.
        # fmt: off
        jobs = [
            Job(
                id, queue, names[task], loads(payload), priority, run_at, attempts,
                max_attempts, error, created, updated, key, locked_at, locked_by, revision,
                None if flags is None else frozenset(json.loads(flags)), task, queue_id,
            )
            for (
                id, queue, payload, priority, run_at, attempts, max_attempts, error,
                created, updated, key, locked_at, locked_by, revision, flags, task, queue_id,
            ) in rows
        ]
        # fmt: on
        if len(jobs) > 1:
            jobs.sort(key=_FETCH_ORDER)
        return jobs

    def take(self, jobs: list[Job], *, idle: bool) -> None:
        """Start (or queue locally) jobs just fetched."""
        self.ttl_expired = False
        now = time.monotonic()
        self.local.extend((job, now) for job in jobs)
        self.fill_slots()
        if idle and jobs and self.any_sync:
            # Let a handler thread just handed a job take the GIL now, rather than
            # when the loop next blocks: it starts its handler that much sooner.
            time.sleep(0)

    def quick_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """The answer of a quick fetch (:mod:`.quick`)."""
        jobs = self.jobs_of(rows)
        if not jobs:
            self.tasks_suspect = True
            self.nudge.set()
            return
        self.take(jobs, idle=True)
        # As after any fetch of what was announced: the next waits until a job ends.
        self.fetch_when_one_ends = True

    def quick_fallback(self) -> None:
        """A quick fetch failed: the fetch task fetches at once."""
        self.notified = max(self.notified, 1)
        self.nudge.set()

    async def fetch_loop(self) -> None:
        try:
            await self._fetch_loop()
        except Exception as exc:
            logger.exception("the worker's fetch loop failed; stopping")
            self.error = exc
            self.request_stop("error", False)

    async def _fetch_loop(self) -> None:
        poll = self.worker.poll_interval
        while not self.stopping:
            if self.tasks_suspect:
                # A quick fetch found none of the jobs announced: they may be another
                # worker's, or of tasks not ours, or ours under task ids we do not know
                # yet. Only the last needs a fetch, so look up the ids first.
                self.tasks_suspect = False
                self.nudge.clear()
                if not await self.tasks_changed() and not self.nudge.is_set():
                    await self.wait_idle(poll)
                continue
            self.expire_local_jobs()
            want = self.fetch_size()
            if want == 0:
                # Busy: wait until the local queue runs low (or a TTL check).
                self.refill.clear()
                await self.refill.wait(poll)
                continue
            announced = want
            notified = self.notified
            idle = not self.running and not self.local
            if notified and idle:
                # Woken from idle by notifications: fetch what they announced (often one
                # job, with the cheaper single-job statement). If that many come, the
                # next fetch, for anything else runnable, waits until one of them ends
                # (or the poll interval), so that nothing delays their start.
                announced = min(want, notified)
            self.notified = 0
            self.fetch_when_one_ends = False
            self.nudge.clear()
            writes_before = self.writes_done
            try:
                jobs = await self.fetch(announced)
            except Exception as exc:
                if isinstance(exc, SchemaNotMigrated) or not _is_transient(exc):
                    logger.exception("fetching jobs failed")
                await _wait_event(self.stop_event, poll)
                continue
            self.take(jobs, idle=idle)
            now = time.monotonic()
            # Task ids are cached; a garbage collection of task rows by any process gives
            # new jobs of our tasks new ids. Look again (with the jobs already started)
            # when announced jobs were not found and at least every poll interval.
            if (
                (notified and not jobs) or now - self.tasks_checked >= poll
            ) and await self.tasks_changed():
                continue
            if len(jobs) >= want:
                continue
            self.fetch_when_one_ends = len(jobs) >= announced
            # The database had fewer runnable jobs than we asked for.
            if self.once:
                if await self.once_finished(jobs, writes_before):
                    return
                continue
            if not self.nudge.is_set():
                await self.wait_idle(poll)

    async def wait_idle(self, poll: float) -> None:
        """Wait for a nudge (or the poll interval); a quick fetch may run meanwhile."""
        quick = self.quick
        if quick is None or not await quick.prepare(self.fetch_connection.raw):
            await self.nudge.wait(poll)
            return
        self.fetch_waiting = True
        try:
            await self.nudge.wait(poll)
        finally:
            self.fetch_waiting = False
            # The connection is the fetch task's again only once the answer is in.
            await quick.settled()

    async def once_finished(self, jobs: list[Job], writes_before: int) -> bool:
        """In run-once mode: whether nothing is left to do, after a short fetch."""
        if jobs or self.running or self.local:
            # Wait for a running job to end (its outcome may unlock a queue).
            if self.running or self.local:
                self.demand.clear()
                await _wait_event(self.demand, self.worker.poll_interval)
            return False
        await self.completer.wait_idle()
        await self.failer.wait_idle()
        if self.writes_done != writes_before:
            return False  # writes since that fetch may have released queues: look again
        self.request_stop("finished", False)
        return True

    def fill_slots(self) -> None:
        if not self.local or self.stopping:
            return
        hooks = self.hooks
        # With nothing to await around the handler (no interceptors, no job_start
        # observers) a job is started directly and finished by a callback: no task of
        # its own and fewer turns of the loop per job. Both ways run the same steps.
        direct = not (
            hooks.before_job_run_hooks or hooks.after_job_run_hooks or hooks.has("job_start")
        )
        limit = self.worker.concurrency
        if direct and self.all_sync:
            # Hand the threads jobs ahead of time (a few each, from the local queue), so
            # a thread that ends a job starts the next one without waiting for the loop.
            # Threads (as many as the concurrency) still bound the jobs running at once.
            limit *= _AHEAD
        tasks = self.worker.tasks
        while self.local and len(self.running) < limit:
            job, fetched = self.local.popleft()
            record = _Running(job, time.monotonic(), fetched)
            self.running[job.id] = record
            entry = tasks.get(job.task_identifier)
            if direct and entry is not None:
                self.start_direct(record, entry)
            else:
                record.task = asyncio.create_task(self.run_job(record))

    def expire_local_jobs(self) -> None:
        ttl = self.worker.local_queue_ttl
        limit = time.monotonic() - ttl
        # Jobs handed to the threads ahead of time may be waiting there; the first
        # record running is the one fetched first.
        ahead = len(self.running) > self.worker.concurrency
        ahead = ahead and next(iter(self.running.values())).fetched < limit
        if not (self.local or ahead) or ttl <= 0:
            return
        expired = []
        while self.local and self.local[0][1] < limit:
            expired.append(self.local.popleft()[0])
        if ahead:
            for args in self.threads.take_waiting(lambda args: args[0].fetched < limit):
                expired.append(self.unstarted(args[0]))
        if expired:
            self.ttl_expired = True
            logger.info("returning %d job(s) unstarted for %g s", len(expired), ttl)
            self._returns.append(asyncio.create_task(self.return_jobs(expired)))

    async def return_local_jobs(self) -> None:
        jobs = [job for job, _ in self.local]
        self.local.clear()
        # Jobs handed to the threads ahead of time that no thread has started yet.
        jobs += [self.unstarted(args[0]) for args in self.threads.take_waiting()]
        if jobs:
            await self.return_jobs(jobs)

    def unstarted(self, record: _Running) -> Job:
        """Forget a job taken back from the threads before it started."""
        if self.running.get(record.job.id) is record:
            del self.running[record.job.id]
            self.demand.set()
        return record.job

    async def return_jobs(self, jobs: list[Job]) -> None:
        try:
            rows = await self.execute(
                self.sql.return_jobs,
                {"worker_id": self.worker_id, "ids": [job.id for job in jobs]},
                what="returning unstarted jobs",
                retries=20,
                retry_any=True,
            )
        except Exception:
            logger.exception(
                "could not return %d unstarted job(s); they stay locked until the 4-hour sweep",
                len(jobs),
            )
            return
        returned = {row["id"] for row in rows}
        for job in jobs:
            if job.id not in returned:
                await self.lock_lost(job, "return")
        if any(job.job_queue_id is not None for job in jobs):
            self.nudge.set()

    # -- running jobs -----------------------------------------------------------------

    def context(self, job: Job) -> WorkerContext:
        return WorkerContext(
            job, self.worker_id, None, self.utils, self.cancellation, self.async_utils
        )

    async def run_job(self, record: _Running) -> None:
        try:
            outcome = await self.execute_job(record)
        finally:
            self.release_slot(record)
        self.record_outcome(record, outcome)

    def release_slot(self, record: _Running) -> None:
        if self.running.get(record.job.id) is record:
            del self.running[record.job.id]
        self.demand.set()
        if self.fetch_when_one_ends:
            self.fetch_when_one_ends = False
            self.nudge.set()
        self.fill_slots()
        if not self.refill.is_set() and self.fetch_size() > 0:
            self.refill.set()

    def record_outcome(self, record: _Running, outcome: _Failure | None) -> None:
        job = record.job
        if record.abandoned:
            logger.warning(
                "job %d (%s) finished after it was failed by the shutdown; outcome dropped",
                job.id,
                job.task_identifier,
            )
            return
        if outcome is None:
            self.completer.add(_Completion(job, time.monotonic() - record.started))
        else:
            outcome.duration = time.monotonic() - record.started
            self.failer.add(outcome)

    # The direct way: execute_job's steps without interceptors, as callbacks.

    def start_direct(self, record: _Running, entry: WorkerTask) -> None:
        job = record.job
        ctx = self.context(job)
        if not entry.is_async:
            done = functools.partial(self.handler_returned, record, entry)
            self.threads.call(self.start_in_thread, (record, entry, ctx), done, takeable=True)
            return
        try:
            coroutine = entry.invoke(job.payload, ctx)
        except Exception as exc:
            # Not now: this runs inside fill_slots, which the outcome would re-enter.
            self.loop.call_soon(self.handler_returned, record, entry, None, exc)
            return
        self.await_direct(record, entry, coroutine)

    def start_in_thread(self, record: _Running, entry: WorkerTask, ctx: WorkerContext) -> Any:
        record.started = time.monotonic()  # it may have waited for a thread
        return self.run_in_thread(record, entry, record.job.payload, ctx)

    def run_in_thread(
        self, record: _Running, entry: WorkerTask, payload: Any, ctx: WorkerContext
    ) -> Any:
        """Run a ``def`` handler (in a handler thread).

        An awaitable it returns is awaited on the loop while this thread waits for it:
        the job keeps its thread, so the threads keep bounding the jobs running at once.
        """
        result = entry.invoke(payload, ctx)
        if result is None or not inspect.isawaitable(result):
            return result
        return asyncio.run_coroutine_threadsafe(
            self.await_handler(record, result), self.loop
        ).result()

    async def await_handler(self, record: _Running, awaitable: Any) -> Any:
        record.handler = asyncio.ensure_future(awaitable)
        return await record.handler

    def handler_cancelled(self, record: _Running, error: BaseException) -> bool:
        """Whether ``error`` says the shutdown cancelled the job's awaitable."""
        return (
            isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError))
            and record.handler is not None
            and record.handler.cancelled()
        )

    def await_direct(self, record: _Running, entry: WorkerTask, awaitable: Any) -> None:
        record.handler = handler = asyncio.ensure_future(awaitable)
        handler.add_done_callback(functools.partial(self.handler_done, record, entry))

    def handler_done(
        self, record: _Running, entry: WorkerTask, handler: asyncio.Future[Any]
    ) -> None:
        if handler.cancelled():
            error: BaseException | None = self.cancelled_failure()
            result = None
        else:
            error = handler.exception()
            result = None if error is not None else handler.result()
        self.handler_returned(record, entry, result, error)

    def handler_returned(
        self, record: _Running, entry: WorkerTask, result: Any, error: BaseException | None
    ) -> None:
        if error is not None and self.handler_cancelled(record, error):
            error = self.cancelled_failure()
        replacement: Any = UNCHANGED
        if error is None and entry.is_batch:
            try:
                failure = batch_outcome(record.job.payload, result)
            except Exception as exc:
                error = exc
            else:
                if failure is not None:
                    error = _BatchItemsFailed(failure)
                    if failure.payload is not None:
                        replacement = failure.payload
        outcome = None
        if error is not None:
            outcome = _Failure(record.job, _message(error), error, 0.0, replacement)
        self.release_slot(record)
        self.record_outcome(record, outcome)

    def cancelled_failure(self) -> _ShutdownFailure:
        return _ShutdownFailure(
            "Worker shutdown: job cancelled after the "
            f"{self.worker.shutdown_grace_period:g} s grace period"
        )

    async def execute_job(self, record: _Running) -> _Failure | None:
        """Run the interceptors and the handler; ``None`` on success, else the failure."""
        job = record.job
        entry = self.worker.tasks.get(job.task_identifier)
        payload = job.payload
        error: BaseException | None = None
        replacement: Any = UNCHANGED
        run = True
        if self.hooks.before_job_run_hooks:
            try:
                decision = await self.hooks.intercept_before_run(
                    BeforeJobRunContext(job, self.worker_id, payload)
                )
            except Exception as exc:
                decision = Fail(_describe(exc))
            if isinstance(decision, Skip):
                return None
            if isinstance(decision, Fail):
                error, run = _HookFailure(decision.message), False
            elif isinstance(decision, Continue) and decision.payload is not UNCHANGED:
                payload = decision.payload
        if run:
            if entry is None:  # a task row renamed under us; never expected
                error = LookupError(f"no handler for task {job.task_identifier!r}")
            else:
                await self.emit("job_start", lambda: JobEvent(job, self.worker_id))
                try:
                    result = await self.call(entry, payload, record)
                    if entry.is_batch:
                        failure = batch_outcome(payload, result)
                        if failure is not None:
                            error = _BatchItemsFailed(failure)
                            if failure.payload is not None:
                                replacement = failure.payload
                except asyncio.CancelledError as exc:
                    if not self.handler_cancelled(record, exc):
                        raise  # we are being cancelled ourselves, not the handler
                    error = self.cancelled_failure()
                except Exception as exc:
                    error = self.cancelled_failure() if self.handler_cancelled(record, exc) else exc
        if self.hooks.after_job_run_hooks:
            duration = time.monotonic() - record.started
            try:
                verdict = await self.hooks.intercept_after_run(
                    AfterJobRunContext(job, self.worker_id, error, duration)
                )
            except Exception as exc:
                verdict = Fail(_describe(exc))
            if isinstance(verdict, Skip):
                return None
            if isinstance(verdict, Fail):
                error, replacement = _HookFailure(verdict.message), UNCHANGED
        if error is None:
            return None
        return _Failure(job, _message(error), error, 0.0, replacement)

    async def call(self, entry: WorkerTask, payload: Any, record: _Running) -> Any:
        ctx = self.context(record.job)
        if entry.is_async:
            record.handler = asyncio.ensure_future(entry.invoke(payload, ctx))
            return await record.handler
        return await self.threads.submit(self.run_in_thread, record, entry, payload, ctx)

    # -- writing outcomes -------------------------------------------------------------

    async def write_outcomes(
        self,
        statement: Any,
        params: dict[str, Any],
        jobs: list[Job],
        *,
        doing: str,
        outcome: str,
        held: _HeldConnection,
    ) -> dict[int, Sequence[Any]] | None:
        """Write a batch of outcomes; the rows written, by job id (``None``: it failed).

        ``doing`` names the write in retry warnings ("completing"), ``outcome`` in the
        error when it is given up ("completion").
        """
        try:
            rows = await self.execute(
                statement, params, what=f"{doing} {len(jobs)} job(s)", held=held, tuples=True
            )
        except Exception:
            logger.exception(
                "could not record the %s of job(s) %s; they stay locked until the 4-hour sweep",
                outcome,
                ", ".join(str(job.id) for job in jobs),
            )
            return None
        finally:
            self.writes_done += 1
        return {row[0]: row for row in rows}  # each statement returns the id first

    async def write_completions(self, batch: list[_Completion]) -> None:
        jobs = [c.job for c in batch]
        done = await self.write_outcomes(
            self.sql.complete,
            {"worker_id": self.worker_id, "ids": [job.id for job in jobs]},
            jobs,
            doing="completing",
            outcome="completion",
            held=self.complete_connection,
        )
        if done is None:
            return
        queue_released = False
        log = logger.isEnabledFor(logging.INFO)
        observed = self.hooks.has("job_complete")
        for completion in batch:
            job = completion.job
            if job.id not in done:
                await self.lock_lost(job, "complete")
                continue
            if job.job_queue_id is not None:
                queue_released = True
            if log:
                logger.info(
                    "completed job %d (%s, attempt %d/%d) in %.1f ms",
                    job.id,
                    job.task_identifier,
                    job.attempts,
                    job.max_attempts,
                    completion.duration * 1000,
                )
            if observed:
                await self.hooks.emit(
                    "job_complete", JobCompleteEvent(job, self.worker_id, completion.duration)
                )
        if queue_released:
            self.nudge.set()

    async def write_failures(self, batch: list[_Failure]) -> None:
        jobs = [f.job for f in batch]
        params = {
            "worker_id": self.worker_id,
            "ids": [job.id for job in jobs],
            "messages": [f.message for f in batch],
            "payloads": [None if f.payload is UNCHANGED else _json_text(f.payload) for f in batch],
        }
        written = await self.write_outcomes(
            self.sql.fail,
            params,
            jobs,
            doing="failing",
            outcome="failure",
            held=self.fail_connection,
        )
        if written is None:
            return
        queue_released = False
        for failure in batch:
            job = failure.job
            row = written.get(job.id)
            if row is None:
                await self.lock_lost(job, "fail")
                continue
            queue_released = queue_released or job.job_queue_id is not None
            _, attempts, max_attempts, run_at = row
            permanent = attempts >= max_attempts
            first_line = failure.message.splitlines()[0] if failure.message else ""
            if permanent:
                logger.error(
                    "job %d (%s, attempt %d/%d) failed permanently in %.1f ms: %s",
                    job.id,
                    job.task_identifier,
                    job.attempts,
                    job.max_attempts,
                    failure.duration * 1000,
                    first_line,
                )
            else:
                logger.warning(
                    "job %d (%s, attempt %d/%d) failed in %.1f ms, retry at %s: %s",
                    job.id,
                    job.task_identifier,
                    job.attempts,
                    job.max_attempts,
                    failure.duration * 1000,
                    run_at.isoformat(),
                    first_line,
                )
            event = "job_permanently_fail" if permanent else "job_fail"
            await self.emit(
                event,
                lambda f=failure, r=run_at, p=permanent: JobFailEvent(  # type: ignore[misc]
                    f.job, self.worker_id, f.message, f.exception, not p, r, f.duration
                ),
            )
        if queue_released:
            self.nudge.set()

    async def lock_lost(self, job: Job, outcome: str) -> None:
        logger.warning(
            "job %d (%s, attempt %d): its lock is no longer held by %s; the %s was not "
            "written (the job was unlocked or taken over meanwhile)",
            job.id,
            job.task_identifier,
            job.attempts,
            self.worker_id,
            {"complete": "completion", "fail": "failure", "return": "return"}[outcome],
        )
        await self.emit("job_lock_lost", lambda: JobLockLostEvent(job, self.worker_id, outcome))

    # -- the 4-hour rule --------------------------------------------------------------

    async def sweep(self) -> None:
        try:
            rows = await self.execute(self.sql.sweep, {}, what="unlocking stale locks")
        except Exception:
            logger.exception("the stale-lock sweep failed")
            return
        if rows and (rows[0]["jobs"] or rows[0]["queues"]):
            logger.warning(
                "unlocked %d job(s) and %d queue(s) locked for more than 4 hours",
                rows[0]["jobs"],
                rows[0]["queues"],
            )
            self.nudge.set()

    async def sweep_loop(self) -> None:
        await asyncio.sleep(random.uniform(0, _FIRST_SWEEP_MAX))
        while True:
            await self.sweep()
            await asyncio.sleep(random.uniform(*_SWEEP_INTERVAL))


class _BatchItemsFailed(Exception):
    """Some items of a batch job failed (see :class:`BatchFailure`)."""

    def __init__(self, failure: BatchFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


_FETCH_ORDER = operator.attrgetter("priority", "run_at")


def _message(error: BaseException) -> str:
    if isinstance(error, (_HookFailure, _ShutdownFailure, _BatchItemsFailed, BatchJobError)):
        return str(error) or type(error).__name__
    return _describe(error)


_scan_json: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]  # typeshed has its own class for it
)


def _json_loads(text: str) -> Any:
    """``json.loads`` for the database's JSON text, minus its wrappers' cost.

    A whole document is parsed in one call of the scanner; anything else (whitespace
    around it, or an error to raise) goes to ``json.loads``.
    """
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _json_text(value: Any) -> str:
    from ..tasks import encode_payload

    return encode_payload(value)


class _Flag:
    """An :class:`asyncio.Event` for the fetcher, whose timed wait makes no task.

    ``asyncio.wait_for`` wraps the wait in a task of its own: a few turns of the loop
    between a notification and the fetch it triggers.
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


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
