"""The worker's recovery agent: registration, heartbeats and stale-worker sweeps.

A worker with recovery enabled keeps a row in ``<schema>._sqla_graphile_workers`` fresh
so that other workers can tell it is alive, and sweeps for workers whose heartbeat has
stopped, recovering their jobs (the semantics are in :mod:`sqla_graphile.recovery`)::

    agent = RecoveryAgent(engine, schema, worker_id, config, task_identifiers=tasks)
    await agent.register()   # before the first fetch; raises if it cannot register
    agent.start()            # heartbeat and sweep loops
    ...
    await agent.stop()       # after every outcome is written; deregisters

The heartbeat loop never gives up: a failed heartbeat is logged and retried after a
short backoff, so a worker that lives through a database hiccup is not later judged
dead (and its running jobs re-run) for one unlucky error. If a heartbeat finds the row
gone, a sweep presumed the worker dead: it says so loudly and registers again.

The lease. A peer may judge this worker dead once the database's clock is
``sweep_threshold`` past its last committed heartbeat, and the jobs it recovers run
``recovery_delay`` later. The agent counts from the moment it *sent* its last heartbeat
that succeeded (the commit came after that), and when ``sweep_threshold -
heartbeat_interval`` has passed without another success it calls ``on_fence(True)``:
the worker stops starting jobs and gives up those it runs, at least
``heartbeat_interval`` (plus ``recovery_delay``) before a peer's copy could start. The
next heartbeat sent after the fence began that succeeds calls ``on_fence(False)``; one
sent before and answered late proves nothing about now, and the next goes at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from .._backoff import Backoff
from .._drive import Op, drive_async
from ..errors import MigrationError, is_transient, sqlstate_of, translate_db_error
from ..hooks import Hooks, WorkerRecoveredEvent
from ..recovery import (
    SweepResult,
    WorkerRecoveryConfig,
    deregister_op,
    heartbeat_op,
    heartbeat_then_sweep_op,
    worker_metadata,
)
from ._aio import bounded

__all__ = ["RecoveryAgent"]

logger = logging.getLogger("sqla_graphile.worker.recovery")
_T = TypeVar("_T")

# First retry of a failed heartbeat; doubled per failure, capped at the interval.
_FIRST_RETRY = 0.1
# Attempts at registering when the connection fails (any other error fails at once).
_REGISTER_ATTEMPTS = 5
# Floor of a heartbeat's time limit: a hung connection is given up and retried afresh.
_MIN_CALL_TIMEOUT = 5.0
# Floor of a sweep's time limit (a sweep may update many rows of a dead worker).
_MIN_SWEEP_TIMEOUT = 30.0


class RecoveryAgent:
    """Registers one worker, heartbeats it, and sweeps for dead workers.

    ``engine`` is an async engine on the worker's database (the worker's own); each
    heartbeat is one autocommit statement and each sweep one short transaction, on a
    connection from its pool.
    ``hooks`` receive ``worker_recovered`` after a sweep that recovered something.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        schema: str,
        worker_id: str,
        config: WorkerRecoveryConfig,
        *,
        task_identifiers: Iterable[str] = (),
        hooks: Hooks | None = None,
        on_fence: Callable[[bool], None] | None = None,
    ) -> None:
        self.engine = engine
        self.schema = schema
        self.worker_id = worker_id
        self.config = config
        self.hooks = hooks
        self.metadata = worker_metadata(worker_id, list(task_identifiers))
        self.registered = False
        """Whether the worker's row was written (and not removed by :meth:`stop`)."""
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._tasks: list[asyncio.Task[None]] = []
        interval = config.heartbeat_interval.total_seconds()
        # Past the sweep threshold a heartbeat is useless; a call stuck that long is
        # abandoned so the next attempt can use a fresh connection.
        self._call_timeout = min(
            max(2 * interval, _MIN_CALL_TIMEOUT), config.sweep_threshold.total_seconds()
        )
        self._sweep_timeout = max(_MIN_SWEEP_TIMEOUT, config.sweep_interval.total_seconds())
        self.lease = (config.sweep_threshold - config.heartbeat_interval).total_seconds()
        """Seconds after the last successful heartbeat was sent that the worker fences."""
        self.fenced = False
        self._fenced_at = 0.0
        """When the fence began: only a heartbeat sent after it lifts it."""
        self._on_fence = on_fence
        self._last_ok = time.monotonic()
        self._fence_timer: asyncio.TimerHandle | None = None

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the last successful heartbeat (or registration) was sent."""
        return time.monotonic() - self._last_ok

    # -- lifecycle ----------------------------------------------------------------------

    async def register(self) -> None:
        """Write the worker's row (pid, host, tasks, version); must precede any fetch.

        Connection failures are retried a few times; any other error (the registry
        table missing, say) is raised, and the worker should not start.
        """
        delay = _FIRST_RETRY
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            sent = time.monotonic()
            try:
                await self._run(heartbeat_op(self.schema, self.worker_id, self.metadata))
                self._alive(sent)
                break
            except (DBAPIError, PoolTimeoutError, OSError, asyncio.TimeoutError) as exc:
                if attempt == _REGISTER_ATTEMPTS or not is_transient(exc):
                    if isinstance(exc, DBAPIError):
                        translated = self._registry_missing(exc) or translate_db_error(
                            exc, schema=self.schema
                        )
                        if translated is not None:
                            raise translated from exc
                    raise
                logger.warning(
                    "registering worker %s failed (attempt %d, retrying): %s",
                    self.worker_id,
                    attempt,
                    _first_line(exc),
                )
                await asyncio.sleep(delay)
                delay *= 2
        self.registered = True
        logger.info(
            "worker %s registered for crash recovery (heartbeat every %s, sweep every %s, "
            "dead after %s)",
            self.worker_id,
            self.config.heartbeat_interval,
            self.config.sweep_interval,
            self.config.sweep_threshold,
        )

    def _registry_missing(self, exc: DBAPIError) -> MigrationError | None:
        # The schema exists but predates the registry (or was migrated by Node alone).
        if sqlstate_of(exc) == "42P01" and "_sqla_graphile_workers" in str(exc.orig):
            return MigrationError(
                f"the worker registry {self.schema}._sqla_graphile_workers does not exist: "
                "crash recovery needs the schema migrated by this library "
                "(`graphile-worker migrate` or `alembic upgrade heads`)"
            )
        return None

    def start(self) -> None:
        """Start the heartbeat and sweep loops (after :meth:`register`)."""
        if self._tasks:
            raise RuntimeError("this recovery agent is already started")
        self._alive(self._last_ok)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="sqla_graphile-heartbeat"),
            asyncio.create_task(self._sweep_loop(), name="sqla_graphile-recovery-sweep"),
        ]

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop the loops and, with ``deregister``, remove the worker's row.

        Call it once every outcome of the worker is written. The row is kept when the
        worker still holds locks (outcomes it could not write): it goes stale, and a
        sweep recovers those jobs after the threshold rather than after 4 hours.
        """
        tasks, self._tasks = self._tasks, []
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None
        pending = set(tasks)
        while pending:
            # Cancelled again until they end: Python 3.11's asyncio.wait_for swallows a
            # cancellation that arrives as the call it waits for completes.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_STOP_RECHECK)
        await asyncio.gather(*tasks, return_exceptions=True)  # their errors, retrieved
        if not (deregister and self.registered):
            return
        try:
            removed = await self._run(deregister_op(self.schema, self.worker_id))
        except Exception as exc:
            # Harmless: the row goes stale and the next sweep removes it.
            logger.warning(
                "could not deregister worker %s (a sweep will remove its row): %s",
                self.worker_id,
                _first_line(exc),
            )
            return
        self.registered = False
        if removed:
            logger.info("worker %s deregistered", self.worker_id)
        else:
            logger.warning(
                "worker %s stops while still holding locks; its registry row is left to go "
                "stale so that a sweep recovers them",
                self.worker_id,
            )

    async def __aenter__(self) -> RecoveryAgent:
        await self.register()
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(deregister=exc_type is None)

    # -- one heartbeat, one sweep -------------------------------------------------------

    async def heartbeat(self) -> bool:
        """Send one heartbeat; True when the row was missing (a sweep removed it).

        Errors are raised; the heartbeat loop is what retries them.
        """
        sent = time.monotonic()
        inserted = await self._run(heartbeat_op(self.schema, self.worker_id, self.metadata))
        self._alive(sent)
        self._registered(inserted)
        return inserted

    def _registered(self, inserted: bool) -> None:
        """After a heartbeat (on its own or a sweep's): warn when the row was gone."""
        if inserted:
            logger.warning(
                "worker %s was presumed dead by a sweep (its heartbeat had stopped for "
                "longer than %s) and registers again; jobs it was running may have been "
                "recovered, and their outcomes will not be written by this worker",
                self.worker_id,
                self.config.sweep_threshold,
            )
        self.registered = True

    async def sweep(self) -> SweepResult | None:
        """Run one sweep with the worker's settings; log it, emit ``worker_recovered``.

        Returns ``None`` when the sweep failed (the error is logged, not raised).
        """
        sent = time.monotonic()
        try:
            inserted, result = await self._run(
                heartbeat_then_sweep_op(self.schema, self.config, self.worker_id, self.metadata),
                transaction=True,
            )
            self._alive(sent)
            self._registered(inserted)
        except Exception as exc:
            logger.warning(
                "the recovery sweep of worker %s failed (next in %s): %s",
                self.worker_id,
                self.config.sweep_interval,
                _first_line(exc),
                exc_info=not is_transient(exc),
            )
            return None
        if result.already_running:
            logger.debug("another worker is sweeping; skipped")
            return result
        if result.worker_ids or result.job_ids or result.queue_names:
            logger.warning(
                "recovered %d job(s) and %d queue(s) from dead worker(s) %s; the jobs run "
                "again after %s",
                result.recovered_count,
                len(result.queue_names),
                ", ".join(result.worker_ids) or "-",
                self.config.recovery_delay,
            )
            if self.hooks is not None and self.hooks.has("worker_recovered"):
                await self.hooks.emit(
                    "worker_recovered",
                    WorkerRecoveredEvent(
                        self.worker_id,
                        tuple(result.worker_ids),
                        tuple(result.job_ids),
                        tuple(result.queue_names),
                    ),
                )
        return result

    # -- the lease ----------------------------------------------------------------------

    def _alive(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` (monotonic) committed: the lease runs from there."""
        if sent < self._last_ok:
            return
        self._last_ok = sent
        if self._on_fence is None:
            return
        if self.fenced and sent < self._fenced_at:
            # Sent before the fence began, answered since (held up in the network): it
            # says nothing of now. Lifted, the fence could drop again before the next
            # heartbeat; the heartbeat loop sends that one at once instead.
            return
        remaining = sent + self.lease - time.monotonic()
        if remaining <= 0:
            self._lease_expired()  # answered after its own lease ran out
            return
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        loop = asyncio.get_running_loop()
        self._fence_timer = loop.call_at(loop.time() + remaining, self._lease_expired)
        if self.fenced:
            self.fenced = False
            logger.warning("worker %s reached the database again: no longer fenced", self.worker_id)
            self._on_fence(False)

    def _lease_expired(self) -> None:
        self._fence_timer = None
        if self.fenced or self._on_fence is None:
            return
        self.fenced = True
        self._fenced_at = time.monotonic()
        logger.warning(
            "worker %s is fenced: no heartbeat succeeded for %.1f s, so a peer may soon "
            "judge it dead and recover its jobs; it starts nothing and gives up the jobs "
            "it runs until a heartbeat succeeds",
            self.worker_id,
            self.lease,
        )
        self._on_fence(True)

    # -- loops --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval.total_seconds()
        failures = 0
        while True:
            if failures:
                await asyncio.sleep(_retry_delay(failures, interval))
            elif not self.fenced:  # a fenced worker's heartbeat goes at once: it lifts
                await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except Exception as exc:  # never fatal: the next try may well succeed
                failures += 1
                logger.warning(
                    "heartbeat of worker %s failed (%d in a row, retrying): %s",
                    self.worker_id,
                    failures,
                    _first_line(exc),
                )
                continue
            if failures:
                logger.info(
                    "heartbeats of worker %s resumed after %d failure(s)", self.worker_id, failures
                )
                failures = 0

    async def _sweep_loop(self) -> None:
        interval = self.config.sweep_interval.total_seconds()
        while True:
            # The first sweep runs at once: a restarted fleet recovers its dead promptly.
            await self.sweep()
            await asyncio.sleep(interval)

    async def _run(self, op: Op[_T], *, transaction: bool = False) -> _T:
        """Drive ``op`` within the call time limit, in a transaction if asked.

        Heartbeats and deregistration are single statements: in autocommit they hold
        no lock across a round trip. The sweep needs its transaction (its advisory lock
        and row locks last until the commit).
        """

        async def run() -> _T:
            if transaction:
                async with self.engine.begin() as connection:
                    return await drive_async(connection, op)
            async with self._autocommit.connect() as connection:
                return await drive_async(connection, op)

        timeout = self._sweep_timeout if transaction else self._call_timeout
        return await bounded(run(), timeout)


#: Seconds between cancellations of a loop that has not ended yet (see ``stop``).
_STOP_RECHECK = 0.5


def _retry_delay(failures: int, interval: float) -> float:
    """Backoff after ``failures`` failed heartbeats: short, never longer than the interval."""
    return Backoff(first=_FIRST_RETRY, factor=2.0, cap=interval).delay(failures)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
