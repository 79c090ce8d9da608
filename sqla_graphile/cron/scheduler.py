"""The cron scheduler: adds each item's job for each of its minutes, beside Node's cron.

It shares ``_private_known_crontabs`` with any Node or Python process on the same schema,
so that each minute of an item is scheduled once between them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from .._backoff import Backoff
from .._urls import async_engine_from_url
from ..codec import encode_json_value
from ..errors import InvalidArgument, is_transient
from ..hooks import Hooks
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..sql.cron import cron_statements
from .crontab import CrontabSource, load_crontab
from .fields import ONE_MINUTE, ceil_minute, floor_minute, utc_minute
from .item import Cron, format_timestamp

# Named after the package: logging is configured for sqla_graphile.cron.
logger = logging.getLogger("sqla_graphile.cron")


@dataclass(frozen=True)
class CronTickEvent:
    """``cron_tick``: the scheduler handled minute ``timestamp``.

    Emitted for every minute of the live loop (``backfilled=False``), and for every
    backfilled minute that had due items. ``due`` lists the identifiers matching the
    minute; ``scheduled`` those for which this process added a job (the others were
    already handled by another process, or are in ``failed``); ``failed`` those whose
    job the database refused (each logged; the other items were scheduled all the same).
    """

    timestamp: datetime
    backfilled: bool
    due: tuple[str, ...]
    scheduled: tuple[str, ...]
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CronJobScheduledEvent:
    """``cron_job_scheduled``: this process added item ``cron``'s job for ``timestamp``."""

    cron: Cron
    timestamp: datetime
    backfilled: bool
    job_id: int | None
    """The job's id (``None`` if ``add_job`` wrote nothing because a worker held the job
    of the same key at that moment)."""


_RETRY = Backoff(first=0.2, factor=1.5, cap=60.0, jitter=(0.5, 1.5))

ConnectionFactory = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[Any]]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _describe(exc: BaseException) -> str:
    error = getattr(exc, "orig", None) or exc
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class CronScheduler:
    """Schedules cron items' jobs, as Node graphile-worker's cron does, until stopped.

    ``bind`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, a database URL, or a
    callable returning an async context manager that yields an
    :class:`~sqlalchemy.ext.asyncio.AsyncConnection` (its transactions are managed
    here). ``crontab`` is anything :func:`load_crontab` accepts. ``clock`` returns the
    current time as an aware datetime and ``sleep`` waits a number of seconds; both
    default to the real ones and are there for tests and simulations.

    At start, identifiers never seen in ``_private_known_crontabs`` are recorded (and not
    backfilled); the minutes missed within each item's ``fill`` are scheduled, flagged
    ``backfilled``; then each minute boundary schedules the items matching that minute,
    catching up minute by minute after a pause or a clock jump. Errors restart the whole
    cycle (backfill included) after an exponential backoff of 0.2 s to 60 s.

    Jobs are added by the SQL ``add_job`` in the statement that claims the minute, as
    Node does, so ``before_job_schedule`` interceptors do not see them; the ``cron_tick``
    and ``cron_job_scheduled`` events are emitted through ``hooks``. If the database
    refuses one item's job, the minute's other items are still scheduled: the failure is
    logged, that item's minute stays unclaimed, and the scheduler carries on. A lost
    connection (or another error a retry may cure) restarts the cycle instead.
    """

    def __init__(
        self,
        bind: AsyncEngine | str | ConnectionFactory,
        crontab: CrontabSource,
        *,
        schema: str = DEFAULT_SCHEMA,
        hooks: Hooks | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.schema = validate_schema_name(schema)
        self.items: list[Cron] = load_crontab(crontab)
        self.hooks = hooks
        self.clock: Clock = clock or _utc_now
        self.sleep: Sleep = sleep or asyncio.sleep
        self._bind = bind
        self._owned_engine: AsyncEngine | None = None
        self._attempts = 0
        self._sql = cron_statements(self.schema)

    # -- database -------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        bind = self._bind
        if isinstance(bind, str):
            if self._owned_engine is None:
                # One connection per transaction: the scheduler speaks once a minute, and an
                # idle pooled link could die in between.
                self._owned_engine = async_engine_from_url(bind, poolclass=NullPool)
            bind = self._owned_engine
        if isinstance(bind, AsyncEngine):
            async with bind.begin() as connection:
                yield connection
            return
        async with bind() as connection, connection.begin():
            yield connection

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise InvalidArgument("the cron clock must return aware datetimes")
        return now.astimezone(timezone.utc)

    async def schedule_minute(
        self, ts: datetime, items: Sequence[Cron] | None = None, *, backfilled: bool = False
    ) -> list[str]:
        """Schedule minute ``ts`` for ``items`` (default: those matching it), in one statement.

        Returns the identifiers this call scheduled: those whose minute no other process
        (Python or Node) had handled yet. An item whose job the database refuses is
        logged and reported in the ``cron_tick`` event; the others are scheduled.
        """
        ts = utc_minute(ts)
        due = [item for item in self.items if item.matches(ts)] if items is None else list(items)
        if not due:
            await self._emit("cron_tick", CronTickEvent(ts, backfilled, (), ()))
            return []
        specs = [
            {
                "ordinal": ordinal,
                "identifier": item.identifier,
                "task": item.task,
                "payload": item.job_payload(ts, backfilled=backfilled),
                "queue_name": item.queue,
                "max_attempts": item.max_attempts,
                "job_key": item.job_key,
                "priority": item.priority,
                "job_key_mode": item.job_key_mode,
            }
            for ordinal, item in enumerate(due)
        ]
        failed: list[str] = []

        def refused(spec: dict[str, Any], exc: Exception) -> None:
            failed.append(spec["identifier"])
            logger.error(
                "cron could not add the job of item %r (task %r) for %s; the minute's other "
                "items are scheduled regardless: %s",
                spec["identifier"],
                spec["task"],
                format_timestamp(ts),
                _describe(exc),
                exc_info=None if isinstance(exc, DBAPIError) else exc,
            )

        try:
            rows = await self._add_jobs(specs, ts)
        except Exception as exc:
            if is_transient(exc):
                raise  # a lost connection, say: the cycle restarts, and backfills
            rows = []
            if len(specs) == 1:
                refused(specs[0], exc)
            else:
                # The statement is all or nothing: one refused job would cost every item
                # its minute, every minute. Add each item's job on its own instead.
                for spec in specs:
                    try:
                        rows.extend(await self._add_jobs([spec], ts))
                    except Exception as item_exc:
                        if is_transient(item_exc):
                            raise
                        refused(spec, item_exc)
        by_id = {item.identifier: item for item in due}
        scheduled = [row.identifier for row in rows]
        if scheduled:
            logger.debug("cron scheduled %s for %s", ", ".join(scheduled), format_timestamp(ts))
        await self._emit(
            "cron_tick",
            CronTickEvent(
                ts,
                backfilled,
                tuple(i.identifier for i in due),
                tuple(scheduled),
                tuple(failed),
            ),
        )
        if self.hooks is not None and self.hooks.has("cron_job_scheduled"):
            for row in rows:
                await self.hooks.emit(
                    "cron_job_scheduled",
                    CronJobScheduledEvent(by_id[row.identifier], ts, backfilled, row.job_id),
                )
        return scheduled

    async def _add_jobs(self, specs: list[dict[str, Any]], ts: datetime) -> list[Any]:
        """Claim minute ``ts`` for ``specs`` and add their jobs, in one transaction."""
        async with self._transaction() as connection:
            result = await connection.execute(
                self._sql.schedule, {"specs": encode_json_value(specs), "ts": ts}
            )
            return list(result.all())

    async def _emit(self, event: str, payload: Any) -> None:
        if self.hooks is not None and self.hooks.has(event):
            await self.hooks.emit(event, payload)

    async def register_and_backfill(self, start: datetime) -> None:
        """Record unknown identifiers as known since ``start``; backfill the known ones."""
        start = start.astimezone(timezone.utc)
        async with self._transaction() as connection:
            rows = (await connection.execute(self._sql.read_known)).all()
        known = {row.identifier: row for row in rows}
        unknown = [item.identifier for item in self.items if item.identifier not in known]
        if unknown:
            async with self._transaction() as connection:
                await connection.execute(
                    self._sql.register_unknown, {"identifiers": unknown, "known_since": start}
                )
        largest = max((item.fill for item in self.items), default=timedelta(0))
        if largest <= timedelta(0):
            return
        candidates = [
            (item, known[item.identifier].last_execution or known[item.identifier].known_since)
            for item in self.items
            if item.identifier in known and item.fill > timedelta(0)
        ]
        ts = ceil_minute(start - largest)
        # One minute at a time, in order: last_execution must only ever move forward.
        while ts < start:
            age = start - ts
            due = [
                item
                for item, not_before in candidates
                if item.fill >= age and ts >= not_before and item.matches(ts)
            ]
            if due:
                await self.schedule_minute(ts, due, backfilled=True)
            ts += ONE_MINUTE

    # -- the loop -------------------------------------------------------------------

    async def _wait(self, seconds: float, stop: asyncio.Event) -> bool:
        """Sleep ``seconds`` unless ``stop`` is set first; return whether it is set."""
        if stop.is_set():
            return True
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                if not task.done():
                    task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
        if sleeper.done() and not sleeper.cancelled() and sleeper.exception() is not None:
            raise sleeper.exception()  # type: ignore[misc]
        return stop.is_set()

    async def _cycle(self, stop: asyncio.Event) -> None:
        start = self._now()
        await self.register_and_backfill(start)
        next_ts = ceil_minute(start)
        while not stop.is_set():
            delay = (next_ts - self._now()).total_seconds() + 0.001
            if delay > 0 and await self._wait(delay, stop):
                return
            if stop.is_set():
                return
            self._attempts = 0  # healthy
            if floor_minute(self._now()) < next_ts:
                continue  # woke up early (clock skew): wait again
            # Late (a pause, a clock jump forward): each missed minute in turn, live.
            await self.schedule_minute(next_ts)
            next_ts += ONE_MINUTE

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule jobs until ``stop`` is set; errors restart after a backoff."""
        try:
            while not stop.is_set():
                try:
                    await self._cycle(stop)
                    return
                except Exception as exc:
                    self._attempts += 1
                    # Node's schedule, with jitter against a thundering herd.
                    delay = _RETRY.delay(self._attempts)
                    logger.error(
                        "cron hit an error; restarting in %.0f ms (attempt %d): %s",
                        delay * 1000,
                        self._attempts,
                        exc,
                        exc_info=exc,
                    )
                    if await self._wait(delay, stop):
                        return
        finally:
            if self._owned_engine is not None:
                await self._owned_engine.dispose()
                self._owned_engine = None
