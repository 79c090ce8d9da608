"""The worker: fetches jobs on Node graphile-worker 0.18's protocol and runs Python handlers.

One asyncio event loop drives a run, made of components that each own their state:

* the :class:`~.fetcher.Fetcher` locks jobs and keeps the local queue;
* the :class:`~.executor.Executor` runs handlers and ends each job once;
* the :class:`~.writer.OutcomeWriter` writes completions and failures in batches;
* the :class:`~.connection.Database` seam times out and retries every statement;
* beside them, the LISTEN connection, Node's 4-hour sweep, cron and crash recovery.

A job goes one way: fetched, queued, started, ended, written. :class:`_Run` starts the
components, stops them in reverse order through one :class:`~contextlib.AsyncExitStack`,
and turns signals, fences and breaking migrations into those steps. The fault model is
``docs/fault-model.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .._urls import engine_from_url, normalize_url
from ..cron import Cron, CronScheduler, CrontabSource, load_crontab
from ..errors import DatabaseNewerThanLibrary, SchemaNotMigrated
from ..hooks import Hooks, WorkerFenceEvent, WorkerStartEvent, WorkerStopEvent
from ..job import Job
from ..migrations import check_database
from ..recovery import WorkerRecoveryConfig
from ..schema import DEFAULT_SCHEMA, quote_schema, validate_schema_name
from ..utils import AsyncWorkerUtils, WorkerUtils
from .connection import (
    Database,
    configure_engine,
    first_line,
    listen_kwargs,
    worker_engine,
)
from .decode import json_loads
from .executor import Executor
from .fetcher import LOCAL_QUEUE_HORIZON, Fetcher
from .listener import NotificationListener
from .recovery import RecoveryAgent
from .sql import worker_statements
from .tasks import TaskRegistry
from .writer import Failure, OutcomeWriter

__all__ = ["ForbiddenFlags", "Worker"]

logger = logging.getLogger("sqla_graphile.worker")

#: ``forbidden_flags``: a list, or a function (sync or async) called before each fetch.
ForbiddenFlags = (
    Sequence[str] | Callable[[], "Sequence[str] | Awaitable[Sequence[str] | None] | None"]
)

# Node's stale-lock sweep: first after a random 0–60 s, then every random 8–10 min.
_FIRST_SWEEP_MAX = 60.0
_SWEEP_INTERVAL = (480.0, 600.0)


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
    ``listen``
        Whether to LISTEN for ``jobs:insert``/``worker:migrate`` (polling alone otherwise).
    ``crontab``
        Recurring jobs: crontab text in Node's format, a crontab file (a ``Path``), or
        :class:`~sqla_graphile.cron.Cron` items. Scheduled beside Node workers sharing the
        crontab, each minute once between them. Not run by :meth:`run_once`.
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
        if statement_timeout <= 0:
            raise ValueError("statement_timeout must be positive")
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
            raise ValueError("local_queue_size must be 0 or more")
        self.local_queue_ttl = local_queue_ttl
        self.complete_batch_delay = complete_batch_delay
        self.fail_batch_delay = (
            complete_batch_delay if fail_batch_delay is None else fail_batch_delay
        )
        self.shutdown_grace_period = shutdown_grace_period
        self.statement_timeout = statement_timeout
        self.listen = listen
        # Parsed now, so a bad crontab fails at construction with its line and field.
        self.crontab: list[Cron] = load_crontab(crontab)
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
        self._runtime: _Run | None = None

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
        bind = self.bind if isinstance(self.bind, AsyncEngine) else self._url()
        return worker_engine(bind, private, self.concurrency, self.statement_timeout)

    # -- the run ----------------------------------------------------------------------

    async def _main(self, *, once: bool, handle_signals: bool, private_engine: bool) -> None:
        if self._runtime is not None:
            raise RuntimeError("this worker is already running")
        engine, owned = self._async_engine(private_engine)
        configure_engine(engine, self.statement_timeout)
        runtime = _Run(self, engine, once=once)
        self._runtime = runtime
        try:
            async with contextlib.AsyncExitStack() as stack:
                if owned:
                    stack.push_async_callback(engine.dispose)
                if handle_signals:
                    stack.callback(_install_signals(runtime))
                await runtime.run(stack)
        finally:
            self._runtime = None


def _install_signals(runtime: _Run) -> Callable[[], None]:
    """SIGINT/SIGTERM handlers on the loop (main thread only); returns their removal."""
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            runtime.loop.add_signal_handler(sig, runtime.on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            logger.debug("cannot handle %s here; stop the worker with request_shutdown", sig)
            continue
        installed.append(sig)

    def remove() -> None:
        for sig in installed:
            runtime.loop.remove_signal_handler(sig)

    return remove


class _Run:
    """One run of a :class:`Worker`: its components, its stop, its fence."""

    def __init__(self, worker: Worker, engine: AsyncEngine, *, once: bool) -> None:
        self.worker = worker
        self.once = once
        self.loop = asyncio.get_running_loop()
        self.base_engine = engine
        self.worker_id = worker.worker_id
        self.hooks = worker.hooks
        self.db = Database(engine, worker.schema, worker.statement_timeout)
        self.sql = worker_statements(worker.schema)
        self.started = False
        self.stopping = False
        self.forced = False
        self.stop_reason = "graceful"
        self.force_message = "Forced worker shutdown"
        self.error: BaseException | None = None
        self.signals = 0
        self.stop_event = asyncio.Event()
        self.force_event = asyncio.Event()
        self.listener: NotificationListener | None = None
        self.recovery: RecoveryAgent | None = None
        self.fenced = False
        self._fenced_jobs: list[Job] = []
        self._background: list[asyncio.Task[None]] = []
        self._deadline: float | None = None

    # -- control ------------------------------------------------------------------------

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
            self.stop_reason = reason
            worker = self.worker
            # The documented bound of a graceful shutdown, counted from now.
            self._deadline = (
                time.monotonic() + worker.shutdown_grace_period + 3 * worker.statement_timeout + 1.0
            )
        if force:
            self.forced = True
            self.stop_reason = "forced"
            self.force_message = f"Forced worker shutdown ({reason})"
            self.force_event.set()
        self.stop_event.set()
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None:
            fetcher.wake()

    def on_migrate(self, data: dict[str, Any]) -> None:
        if data.get("breaking") is True:
            # Node's notification names no schema: only our own ledger can tell.
            self._background.append(asyncio.create_task(self._check_ledger(data)))
        else:
            logger.info("a worker schema was migrated (%s)", data.get("migrationNumber"))

    async def _check_ledger(self, data: dict[str, Any]) -> None:
        schema = self.worker.schema
        try:
            async with self.base_engine.connect() as connection:
                await connection.run_sync(lambda c: check_database(c, schema))
        except DatabaseNewerThanLibrary as exc:
            logger.warning(
                "a breaking migration (%s) was applied to the worker schema %r; it is unsafe "
                "to continue, stopping",
                data.get("migrationNumber"),
                schema,
            )
            self.error = exc
            self.request_stop("migrate", False)
        except Exception as exc:
            logger.warning("could not check the ledger after a migration: %s", first_line(exc))
        else:
            logger.info(
                "a breaking migration (%s) was announced, not in schema %r: carrying on",
                data.get("migrationNumber"),
                schema,
            )

    def on_fence(self, fenced: bool) -> None:
        """The recovery agent's lease ran out (``True``) or a heartbeat succeeded again."""
        self.fenced = fenced
        if fenced:
            self.fetcher.pause()  # queued jobs are dropped: reclaimed once unfenced
            self.executor.cancel()
            self._fenced_jobs = [record.job for record in self.executor.abandon()]
            job_ids = tuple(job.id for job in self._fenced_jobs)
            logger.warning(
                "worker %s fenced: gave up %d running job(s): %s",
                self.worker_id,
                len(job_ids),
                ", ".join(map(str, job_ids)) or "-",
            )
            self._spawn(self._emit_fence(True, job_ids))
            return
        jobs, self._fenced_jobs = self._fenced_jobs, []
        self.executor.renew_cancellation()
        # The interrupted attempts are failed if still ours (a peer may have recovered
        # them meanwhile: then the lock is lost, and said so); the rest is reclaimed.
        message = "Worker fenced: its heartbeats failed for longer than its lease"
        for job in jobs:
            self.writer.fail(Failure(job.id, job, message, _ShutdownError(message), 0.0))
        self.fetcher.resume()
        self._spawn(self._emit_fence(False, tuple(job.id for job in jobs)))

    async def _emit_fence(self, fenced: bool, job_ids: tuple[int, ...]) -> None:
        if self.hooks.has("worker_fence"):
            await self.hooks.emit("worker_fence", WorkerFenceEvent(self.worker_id, fenced, job_ids))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        self._background.append(asyncio.ensure_future(coroutine))

    # -- the run ------------------------------------------------------------------------

    async def run(self, stack: contextlib.AsyncExitStack) -> None:
        """Start, wait for a stop, shut down (shielded from the application's cancels)."""
        interrupted: BaseException | None = None
        try:
            await self.start(stack)
            await self.stop_event.wait()
        except asyncio.CancelledError as exc:
            # The application cancelled us: shut down gracefully, then let it through.
            interrupted = exc
            self.request_stop("cancelled", False)
        shutdown = asyncio.ensure_future(stack.aclose())
        while not shutdown.done():
            try:
                await asyncio.shield(shutdown)
            except asyncio.CancelledError as exc:
                # Cancelled again: the shutdown still runs to its end (it is bounded).
                interrupted = interrupted or exc
        shutdown.result()
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        worker = self.worker
        async with self.base_engine.connect() as connection:
            ledger = await connection.run_sync(lambda c: check_database(c, worker.schema))
            recovery = await self._recovery_config(connection)
        if not ledger.table_exists:
            raise SchemaNotMigrated(worker.schema)
        self.writer = OutcomeWriter(
            self.db,
            self.sql,
            self.worker_id,
            self.hooks,
            complete_delay=worker.complete_batch_delay,
            fail_delay=worker.fail_batch_delay,
            encode=_encode,
            on_released=self._on_released,
        )
        self.executor = Executor(
            tasks=worker.tasks,
            concurrency=worker.concurrency,
            grace=worker.shutdown_grace_period,
            hooks=self.hooks,
            worker_id=self.worker_id,
            writer=self.writer,
            utils=worker.create_utils(),
            async_utils=AsyncWorkerUtils(
                self.base_engine,
                worker.schema,
                hooks=self.hooks,
                known_identifiers=worker.task_identifiers,
            ),
            on_slot_free=self._on_slot_free,
        )
        listen = worker.listen and not self.once
        self.fetcher = Fetcher(
            db=self.db,
            sql=self.sql,
            worker_id=self.worker_id,
            identifiers=sorted(worker.tasks),
            executor=self.executor,
            writer=self.writer,
            hooks=self.hooks,
            concurrency=worker.concurrency,
            poll_interval=worker.poll_interval,
            local_queue_size=worker.local_queue_size,
            local_queue_ttl=worker.local_queue_ttl,
            horizon=LOCAL_QUEUE_HORIZON if worker._default_local_queue else None,
            forbidden_flags=worker.forbidden_flags,
            loads=getattr(self.base_engine.dialect, "_json_deserializer", None) or json_loads,
            stop=self.stop_event,
            once=self.once,
            quick=listen,
            # A worker id given may be a crashed run's: give back what that run held.
            reclaim=worker._worker_id_given,
        )
        stack.push_async_callback(self._finish)
        await self.fetcher.register_tasks()
        if recovery is not None:
            self.recovery = RecoveryAgent(
                self.base_engine,
                worker.schema,
                self.worker_id,
                recovery,
                task_identifiers=worker.task_identifiers,
                hooks=self.hooks,
                on_fence=self.on_fence,
            )
            # Before any fetch: every lock of ours must belong to a registered worker.
            await self.recovery.register()
        if self.once:
            await self.sweep()
        logger.info(
            "worker %s started: %d task(s), concurrency %d, schema %r%s",
            self.worker_id,
            len(worker.tasks),
            worker.concurrency,
            worker.schema,
            " (run once)" if self.once else "",
        )
        if self.hooks.has("worker_start"):
            await self.hooks.emit(
                "worker_start",
                WorkerStartEvent(
                    self.worker_id, worker.schema, worker.concurrency, worker.task_identifiers
                ),
            )
        if listen:
            self.listener = NotificationListener(
                listen_kwargs(self.base_engine, worker.statement_timeout),
                on_insert=self.fetcher.on_insert,
                on_migrate=self.on_migrate,
                on_connect=self.fetcher.nudge.set,
                timeout=worker.statement_timeout,
            )
            self._background.append(asyncio.create_task(self.listener.run(), name="listener"))
        if not self.once:
            self._background.append(asyncio.create_task(self.sweep_loop(), name="sweep"))
        if worker.crontab and not self.once:
            scheduler = CronScheduler(
                self.base_engine, worker.crontab, schema=worker.schema, hooks=self.hooks
            )
            # Cancelled with the other background tasks at shutdown; a minute being
            # claimed then rolls back and is claimed again by whoever runs next.
            self._background.append(
                asyncio.create_task(scheduler.run(asyncio.Event()), name="cron")
            )
        if self.recovery is not None:
            self.recovery.start()
        self.fetch_task = asyncio.create_task(self._fetch(), name="sqla_graphile-fetcher")
        self.started = True

    async def _recovery_config(self, connection: Any) -> WorkerRecoveryConfig | None:
        configured = self.worker.recovery
        if configured is not None:
            return configured if configured.enabled else None
        # The default: on wherever the schema has our worker registry.
        registry = f"{quote_schema(self.worker.schema)}._sqla_graphile_workers"
        found = await connection.execute(text("select to_regclass(:name)"), {"name": registry})
        if found.scalar() is None:
            logger.info(
                "no worker registry in schema %r: crash recovery is off", self.worker.schema
            )
            return None
        return WorkerRecoveryConfig(enabled=True)

    async def _fetch(self) -> None:
        try:
            await self.fetcher.run()
        except Exception as exc:
            logger.exception("the worker's fetch loop failed; stopping")
            self.error = exc
        if self.once or self.error is not None:
            self.request_stop("finished" if self.error is None else "error", False)

    def _on_slot_free(self) -> None:
        self.fetcher.on_slot_free()

    def _on_released(self) -> None:
        self.fetcher.nudge.set()

    # -- shutdown -----------------------------------------------------------------------

    async def _finish(self) -> None:
        """Stop every component, newest first; bounded by the shutdown deadline."""
        if self._deadline is None:
            self.request_stop(self.stop_reason, False)
        assert self._deadline is not None
        self.db.deadline = self._deadline
        fetcher, executor, writer = self.fetcher, self.executor, self.writer
        # 1. The fetch loop ends (a fetch in flight is bounded by its statement timeout).
        fetch_task = getattr(self, "fetch_task", None)
        if fetch_task is not None:
            done, _ = await asyncio.wait([fetch_task], timeout=self.worker.statement_timeout + 1)
            if not done:
                logger.error("the fetch loop did not stop in time; cancelling it")
                fetcher.suspect = True
                fetch_task.cancel()
                await asyncio.gather(fetch_task, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # 2. Jobs fetched but never started go back, attempts restored.
        await fetcher.return_all()
        # 3. Running jobs get the grace period (none after a forced stop); then they are
        #    asked to stop, and what still runs is failed.
        if executor.running and not self.forced:
            await executor.wait(self.worker.shutdown_grace_period, self.force_event)
        if executor.running:
            executor.cancel()
            if not self.forced:
                await executor.wait(min(1.0, self.worker.shutdown_grace_period), self.force_event)
        if executor.running:
            self._fail_abandoned()
        # 4. Every outcome is written (or given up at the deadline) before we return.
        await writer.close()
        if fetcher.suspect:
            await fetcher.reclaim(set())
        executor.close()
        await fetcher.close()
        if self.recovery is not None:
            # Heartbeats went on through the grace period; every outcome is written now.
            # Deregistering may not outlast the deadline: the row then goes stale.
            remaining = max(1.0, self._deadline - time.monotonic())
            try:
                await asyncio.wait_for(self.recovery.stop(), remaining)
            except asyncio.TimeoutError:
                logger.warning("could not deregister worker %s in time", self.worker_id)
        reason = "forced" if self.forced else self.stop_reason
        if self.started:
            logger.info("worker %s stopped (%s)", self.worker_id, reason)
        if self.hooks.has("worker_stop"):
            await self.hooks.emit(
                "worker_stop", WorkerStopEvent(self.worker_id, reason, self.error)
            )

    def _fail_abandoned(self) -> None:
        records = self.executor.abandon()
        if self.forced:
            message = self.force_message
        else:
            message = (
                "Worker shutdown: job still running after the "
                f"{self.worker.shutdown_grace_period:g} s grace period"
            )
        logger.warning(
            "failing %d job(s) still running at shutdown: %s",
            len(records),
            ", ".join(str(r.job.id) for r in records),
        )
        now = time.monotonic()
        for record in records:
            job = record.job
            self.writer.fail(
                Failure(job.id, job, message, _ShutdownError(message), now - record.started)
            )

    # -- the 4-hour rule ----------------------------------------------------------------

    async def sweep(self) -> None:
        try:
            rows = await self.db.execute(self.sql.sweep, {}, what="unlocking stale locks")
        except Exception:
            logger.exception("the stale-lock sweep failed")
            return
        if rows and (rows[0]["jobs"] or rows[0]["queues"]):
            logger.warning(
                "unlocked %d job(s) and %d queue(s) locked for more than 4 hours",
                rows[0]["jobs"],
                rows[0]["queues"],
            )
            self.fetcher.nudge.set()

    async def sweep_loop(self) -> None:
        await asyncio.sleep(random.uniform(0, _FIRST_SWEEP_MAX))
        while True:
            await self.sweep()
            await asyncio.sleep(random.uniform(*_SWEEP_INTERVAL))


class _ShutdownError(Exception):
    """A job interrupted by the worker's shutdown."""


def _encode(value: Any) -> str:
    from ..tasks import encode_payload

    return encode_payload(value)
