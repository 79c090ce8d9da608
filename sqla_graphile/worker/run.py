"""One run of a worker: its components, started and stopped through one exit stack.

* the :class:`~.fetcher.Fetcher` locks jobs and keeps the local queue;
* the :class:`~.executor.Executor` runs handlers and ends each job once;
* the :class:`~.writer.OutcomeWriter` writes completions and failures in batches;
* the :class:`~.connection.Database` seam times out and retries every statement;
* beside them, the LISTEN connection, Node's 4-hour sweep, cron and crash recovery.

A job goes one way: fetched, queued, started, ended, written. :class:`WorkerRun` starts
the components, stops them through one :class:`~contextlib.AsyncExitStack`, and turns
signals, fences and breaking migrations into those steps. The fault model is
``docs/fault-model.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .._sqlalchemy import json_deserializer
from ..codec import encode_payload
from ..cron import Cron, CronScheduler
from ..errors import DatabaseNewerThanLibrary, SchemaNotMigrated
from ..hooks import Hooks, WorkerFenceEvent, WorkerStartEvent, WorkerStopEvent
from ..job import Job
from ..migrations import check_database
from ..recovery import WorkerRecoveryConfig
from ..schema import worker_schema
from ..sql import statements
from ..sql.catalog import qualified_name
from ..utils import AsyncWorkerUtils, WorkerUtils
from ._aio import bounded
from .connection import Database, first_line, listen_kwargs
from .decode import json_loads
from .executor import Executor
from .fetcher import Fetcher, ForbiddenFlags
from .listener import NotificationListener
from .ops import sweep_locks_op
from .recovery import RecoveryAgent
from .tasks import TaskRegistry
from .watchdog import HandlerStuck, Watchdog
from .writer import Failure, OutcomeWriter

__all__ = ["RunSettings", "WorkerRun", "install_signals"]

logger = logging.getLogger("sqla_graphile.worker")

# Node's stale-lock sweep: first after a random 0–60 s, then every random 8–10 min.
_FIRST_SWEEP_MAX = 60.0
_SWEEP_INTERVAL = (480.0, 600.0)


@dataclass(frozen=True)
class RunSettings:
    """What one run of a worker is made of, read from the :class:`Worker` as it starts."""

    schema: str
    tasks: TaskRegistry
    worker_id: str
    concurrency: int
    poll_interval: float
    forbidden_flags: ForbiddenFlags | None
    hooks: Hooks
    local_queue_size: int
    local_queue_horizon: float | None
    """The default local queue's time bound (``None``: a size given is kept as given)."""
    local_queue_ttl: float
    complete_batch_delay: float
    fail_batch_delay: float
    shutdown_grace_period: float
    statement_timeout: float
    job_timeout: float | None
    """Each job's time limit unless its task has one (``None``: no limit)."""
    listen: bool
    crontab: list[Cron]
    recovery: WorkerRecoveryConfig | None
    reclaim_at_start: bool
    """The worker id was given: it may be a crashed run's, whose locks are given back."""
    utils: WorkerUtils
    overtime_limit: float | None = None
    """Seconds a timed-out ``def`` handler may run on before it is stuck (``None``: no limit)."""
    recycle_when_stuck: bool = False
    """Stop the run (raising :class:`~.watchdog.HandlerStuck`) when a handler is stuck."""

    @property
    def task_identifiers(self) -> frozenset[str]:
        """The identifiers of the tasks run."""
        return frozenset(self.tasks)


def install_signals(runtime: WorkerRun) -> Callable[[], None]:
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


class WorkerRun:
    """One run of a worker: its components, its stop, its fence."""

    def __init__(self, worker: RunSettings, engine: AsyncEngine, *, once: bool) -> None:
        self.worker = worker
        self.once = once
        self.loop = asyncio.get_running_loop()
        self.base_engine = engine
        self.worker_id = worker.worker_id
        self.hooks = worker.hooks
        self.db = Database(engine, worker.schema, worker.statement_timeout)
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
        self.watchdog: Watchdog | None = None
        self.fenced = False
        self._fenced_jobs: list[Job] = []
        self._background: list[asyncio.Task[None]] = []
        self._deadline: float | None = None

    # -- control ------------------------------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGINT/SIGTERM: the first stops gracefully, the next forces."""
        self.signals += 1
        if self.signals == 1:
            logger.info("%s received: shutting down gracefully (again to force)", sig.name)
            self.request_stop("graceful", False)
        else:
            logger.warning("%s received again: forcing the shutdown", sig.name)
            self.request_stop(f"forced by {sig.name}", True)

    def request_stop(self, reason: str, force: bool) -> None:
        """Stop the run (``force``: no grace period); the shutdown deadline starts now."""
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
        """A ``worker:migrate`` notification (of this schema or another)."""
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

    def _recycle(self, stuck: HandlerStuck) -> None:
        """A handler thread is stuck: stop gracefully, and have the run raise ``stuck``."""
        if self.error is None:
            self.error = stuck
        self.request_stop("recycle", False)

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
        """Check the schema, build the components, register, and start fetching."""
        worker = self.worker
        async with self.base_engine.connect() as connection:
            ledger = await connection.run_sync(lambda c: check_database(c, worker.schema))
            recovery = await self._recovery_config(connection)
        if not ledger.table_exists:
            raise SchemaNotMigrated(worker.schema)
        self.writer = OutcomeWriter(
            self.db,
            worker.schema,
            self.worker_id,
            self.hooks,
            complete_delay=worker.complete_batch_delay,
            fail_delay=worker.fail_batch_delay,
            encode=encode_payload,
            on_released=self._on_released,
        )
        self.executor = Executor(
            tasks=worker.tasks,
            concurrency=worker.concurrency,
            grace=worker.shutdown_grace_period,
            job_timeout=worker.job_timeout,
            hooks=self.hooks,
            worker_id=self.worker_id,
            writer=self.writer,
            utils=worker.utils,
            async_utils=AsyncWorkerUtils(
                self.base_engine,
                worker.schema,
                hooks=self.hooks,
                known_identifiers=worker.task_identifiers,
            ),
            on_slot_free=self._on_slot_free,
        )
        self.watchdog = Watchdog(
            self.executor,
            worker.overtime_limit,
            on_stuck=self._recycle if worker.recycle_when_stuck else None,
        )
        listen = worker.listen and not self.once
        self.fetcher = Fetcher(
            db=self.db,
            schema=worker.schema,
            worker_id=self.worker_id,
            identifiers=sorted(worker.tasks),
            executor=self.executor,
            writer=self.writer,
            hooks=self.hooks,
            concurrency=worker.concurrency,
            poll_interval=worker.poll_interval,
            local_queue_size=worker.local_queue_size,
            local_queue_ttl=worker.local_queue_ttl,
            horizon=worker.local_queue_horizon,
            forbidden_flags=worker.forbidden_flags,
            loads=json_deserializer(self.base_engine.dialect) or json_loads,
            stop=self.stop_event,
            once=self.once,
            quick=listen,
            # A worker id given may be a crashed run's: give back what that run held.
            reclaim=worker.reclaim_at_start,
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
        ws = worker_schema(self.worker.schema)
        found = await connection.execute(
            statements(ws.name).catalog.relation,
            {"name": qualified_name(ws, ws.worker_registry.name)},
        )
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
        # 3. Handlers stuck past their time limit are not waited for (their jobs were
        #    failed then). Running jobs get the grace period (none after a forced stop);
        #    then they are asked to stop, and what still runs is failed.
        if self.watchdog is not None:
            self.watchdog.stop()
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
                await bounded(self.recovery.stop(), remaining)
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
        if not records:  # only handlers of jobs already failed at their time limit ran on
            return
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
        """Node's 4-hour rule: unlock jobs and queues locked for longer."""
        try:
            jobs, queues = await self.db.drive(
                sweep_locks_op(self.worker.schema), what="unlocking stale locks"
            )
        except Exception:
            logger.exception("the stale-lock sweep failed")
            return
        if jobs or queues:
            logger.warning(
                "unlocked %d job(s) and %d queue(s) locked for more than 4 hours", jobs, queues
            )
            self.fetcher.nudge.set()

    async def sweep_loop(self) -> None:
        """The 4-hour sweep at Node's random intervals."""
        await asyncio.sleep(random.uniform(0, _FIRST_SWEEP_MAX))
        while True:
            await self.sweep()
            await asyncio.sleep(random.uniform(*_SWEEP_INTERVAL))


class _ShutdownError(Exception):
    """A job interrupted by the worker's shutdown."""
