"""What the dashboard's pages show, read with the library's operations in one transaction.

Each request runs in a transaction of its own with ``SET LOCAL statement_timeout`` (and,
for pages, read only), on an async engine. The reads reuse the public admin surface:
:class:`~sqla_graphile.admin.WorkerStats`, :func:`~sqla_graphile._admin.get_job_op`,
:func:`~sqla_graphile._admin.lock_holders_op`, the recovery registry's
:func:`~sqla_graphile.recovery.list_active_workers_op`, the health numbers of
:mod:`sqla_graphile._queue_metrics`; the job list is the dashboard's own keyset query
(:mod:`sqla_graphile.sql.dashboard`).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._admin import get_job_op, lock_holders_op, state_of
from .._drive import Op, drive_async
from .._queue_metrics import QueueSample, read_queue_samples
from ..admin import JobState, LockHolder, QueueStats, WorkerStats
from ..cron import Cron
from ..job import Job
from ..recovery import ActiveWorker, list_active_workers_op
from ..sql import statements
from ..sql.catalog import qualified_name

__all__ = [
    "CronRow",
    "Database",
    "JobFilter",
    "JobRow",
    "JobsPage",
    "Overview",
    "Rate",
    "Throughput",
    "Workers",
    "jobs_page_op",
]

#: A cursor above every job id: the first page.
_TOP = 2**63 - 1
#: Named queues the overview lists at most.
MAX_QUEUES = 500


@dataclass(frozen=True)
class JobFilter:
    """The job list's filters and cursor (``before``: list jobs with a lower id)."""

    state: JobState = JobState.ALL
    task: str | None = None
    queue: str | None = None
    key: str | None = None
    text: str | None = None
    before: int | None = None

    def params(self) -> dict[str, str]:
        """The filters as query parameters (the cursor left out)."""
        found = {"task": self.task, "queue": self.queue, "key": self.key, "text": self.text}
        values = {name: value for name, value in found.items() if value}
        if self.state is not JobState.ALL:
            values["state"] = self.state.value
        return values


@dataclass(frozen=True)
class JobRow:
    """One row of the job list (no payload; ``last_error`` cut short)."""

    id: int
    task_identifier: str
    queue_name: str | None
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    last_error: str | None
    key: str | None
    locked_at: datetime | None
    locked_by: str | None
    created_at: datetime
    state: JobState


@dataclass(frozen=True)
class JobsPage:
    """A page of jobs, and the cursor of the next one (``None``: no more jobs).

    ``search_further``: the page stopped at the end of its scan window, not because it
    was full; the next cursor continues the search below the jobs already looked at.
    """

    rows: list[JobRow]
    next_before: int | None
    search_further: bool = False
    scanned: int = 0


def jobs_page_op(schema: str, where: JobFilter, *, limit: int, scan: int) -> Op[JobsPage]:
    """A page of at most ``limit`` jobs matching ``where``, looking at ``scan`` jobs at most."""
    sql = statements(schema).dashboard
    query = sql.jobs_page(
        where.state,
        by_task=where.task is not None,
        by_queue=where.queue is not None,
        by_key=where.key is not None,
        by_text=where.text is not None,
    )
    before = _TOP if where.before is None else where.before
    params = {
        "before": before,
        "scan": scan,
        "limit": limit + 1,  # one more than shown: whether a next page exists
        "task_identifier": where.task,
        "queue_name": where.queue,
        "key": where.key,
        "text": where.text,
    }
    result = yield query, params
    rows = [
        JobRow(
            **{name: value for name, value in row.items() if name != "now"},
            state=state_of(
                row["locked_at"], row["attempts"], row["max_attempts"], row["run_at"], row["now"]
            ),
        )
        for row in result.mappings()
    ]
    if len(rows) > limit:
        return JobsPage(rows[:limit], rows[limit - 1].id)
    if where.key is not None:
        return JobsPage(rows, None)
    end = (yield sql.scan_end, {"before": before, "scan": scan}).mappings().one()
    low, seen = end["low"], end["seen"]
    if seen < scan:  # the window reached the oldest job: nothing below
        return JobsPage(rows, None, scanned=seen)
    return JobsPage(rows, low, search_further=True, scanned=seen)


@dataclass(frozen=True)
class Rate:
    """Jobs added and finished (completed, removed or deleted) per minute over a window."""

    minutes: int
    added: float
    finished: float
    measured_over: timedelta


@dataclass
class Throughput:
    """Samples of (clock, total jobs, highest id), kept for ``keep``, turned into rates.

    The schema keeps no history of finished jobs (they are deleted), so throughput is
    measured between samples: jobs added = growth of the highest id, jobs finished =
    jobs added less the growth of the total.
    """

    keep: timedelta = timedelta(minutes=16)
    windows: Sequence[int] = (1, 5, 15)
    samples: collections.deque[tuple[datetime, int, int]] = field(default_factory=collections.deque)

    def record(self, now: datetime, total: int, max_id: int | None) -> None:
        """Keep one sample; drop those older than :attr:`keep`."""
        self.samples.append((now, total, max_id or 0))
        while self.samples and self.samples[0][0] < now - self.keep:
            self.samples.popleft()

    def rates(self) -> list[Rate]:
        """A rate per window, from the latest sample at least a window old to the newest.

        Without a sample that old, the oldest one is used (the rate is then measured over
        less than the window, as :attr:`Rate.measured_over` says).
        """
        if len(self.samples) < 2:
            return []
        now, total, max_id = self.samples[-1]
        found = []
        for minutes in self.windows:
            cutoff = now - timedelta(minutes=minutes)
            older = [s for s in self.samples if s[0] <= cutoff]
            start = older[-1] if older else self.samples[0]
            if start[0] >= now:
                continue
            span = now - start[0]
            added = max(0, max_id - start[2])
            finished = max(0, added - (total - start[1]))
            per_minute = 60 / span.total_seconds()
            found.append(Rate(minutes, added * per_minute, finished * per_minute, span))
        return found


@dataclass(frozen=True)
class Overview:
    """The overview page: counts, per task and queue, throughput."""

    stats: WorkerStats
    groups: list[QueueSample]
    rates: list[Rate]
    now: datetime


@dataclass(frozen=True)
class Workers:
    """The workers page: registered workers and every lock holder."""

    registered: list[ActiveWorker]
    holders: list[LockHolder]
    threshold: timedelta
    now: datetime


@dataclass(frozen=True)
class CronRow:
    """A known crontab item, with its schedule and next run when the crontab is given."""

    identifier: str
    known_since: datetime | None
    last_execution: datetime | None
    item: Cron | None
    next_run: datetime | None


def _next_run(item: Cron, after: datetime, horizon: timedelta) -> datetime | None:
    minute = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    end = after + horizon
    while minute <= end:
        if item.matches(minute):
            return minute
        minute += timedelta(minutes=1)
    return None


def _stats(groups: Sequence[QueueSample], queues: Sequence[Any]) -> WorkerStats:
    """:class:`~sqla_graphile.admin.WorkerStats` summed from per task and queue groups."""
    per_queue: collections.Counter[str | None] = collections.Counter()
    for group in groups:
        per_queue[group.queue_name] += (
            group.runnable + group.scheduled + group.locked + group.permanently_failed
        )
    ages = [g.oldest_runnable_age for g in groups if g.oldest_runnable_age is not None]
    ready = sum(g.runnable for g in groups)
    scheduled = sum(g.scheduled for g in groups)
    locked = sum(g.locked for g in groups)
    failed = sum(g.permanently_failed for g in groups)
    return WorkerStats(
        ready=ready,
        scheduled=scheduled,
        locked=locked,
        failed=failed,
        total=ready + scheduled + locked + failed,
        oldest_ready_age=timedelta(seconds=max(ages)) if ages else None,
        queues=[
            QueueStats(name, per_queue.get(name, 0), locked_by, locked_at)
            for name, locked_by, locked_at in queues
        ],
    )


class Database:
    """The dashboard's transactions on an async engine, each bounded in time."""

    def __init__(self, engine: AsyncEngine, schema: str, statement_timeout: float) -> None:
        self.engine = engine
        self.schema = schema
        self.timeout_ms = str(max(1, int(statement_timeout * 1000)))
        self.sql = statements(schema)

    @asynccontextmanager
    async def transaction(self, *, read_only: bool = True) -> AsyncIterator[AsyncConnection]:
        """A transaction whose statements time out; read only unless asked otherwise."""
        async with self.engine.begin() as connection:
            await connection.execute(self.sql.dashboard.statement_timeout, {"ms": self.timeout_ms})
            if read_only:
                await connection.execute(self.sql.dashboard.read_only)
            yield connection

    async def overview(self, throughput: Throughput) -> Overview:
        """Counts by state and per queue, per task and queue, and throughput.

        The jobs are read once, by the queue health numbers' query (one scan, grouped by
        task and queue); the counts by state and per queue are summed from its groups.
        """
        async with self.transaction() as connection:
            groups = await connection.run_sync(read_queue_samples, self.schema)
            queues = (
                await connection.execute(self.sql.dashboard.queues, {"limit": MAX_QUEUES})
            ).all()
            max_id, now = (await connection.execute(self.sql.dashboard.max_job_id)).one()
        stats = _stats(groups, queues)
        throughput.record(now, stats.total, max_id)
        return Overview(stats, groups, throughput.rates(), now)

    async def sample(self, throughput: Throughput) -> None:
        """One throughput sample (the background sampler's)."""
        async with self.transaction() as connection:
            total, max_id, now = (await connection.execute(self.sql.dashboard.sample)).one()
        throughput.record(now, total, max_id)

    async def jobs(self, where: JobFilter, *, limit: int, scan: int) -> JobsPage:
        """A page of the job list."""
        async with self.transaction() as connection:
            return await drive_async(
                connection, jobs_page_op(self.schema, where, limit=limit, scan=scan)
            )

    async def job(self, job_id: int) -> tuple[Job | None, datetime]:
        """One job with its payload, and the database's clock."""
        async with self.transaction() as connection:
            job = await drive_async(connection, get_job_op(self.schema, job_id))
            now = (await connection.execute(self.sql.admin.now)).scalar_one()
        return job, now

    async def workers(self, threshold: timedelta) -> Workers:
        """Registered workers (stale past ``threshold``) and every lock holder."""
        async with self.transaction() as connection:
            registered: list[ActiveWorker] = []
            name = qualified_name(self.sql.schema, self.sql.schema.worker_registry.name)
            if await connection.scalar(self.sql.catalog.relation, {"name": name}):
                registered = await drive_async(
                    connection, list_active_workers_op(self.schema, threshold)
                )
            holders = await drive_async(connection, lock_holders_op(self.schema))
            now = (await connection.execute(self.sql.admin.now)).scalar_one()
        return Workers(registered, holders, threshold, now)

    async def cron(self, items: Sequence[Cron]) -> tuple[list[CronRow], datetime]:
        """Every known crontab item and every item of ``items``, with their next runs."""
        async with self.transaction() as connection:
            known = (await connection.execute(self.sql.cron.read_known)).all()
            now = (await connection.execute(self.sql.admin.now)).scalar_one()
        by_id = {item.identifier: item for item in items}
        rows = []
        seen = set()
        for identifier, known_since, last_execution in known:
            item = by_id.get(identifier)
            seen.add(identifier)
            after = _next_run(item, now, timedelta(days=8)) if item else None
            rows.append(CronRow(identifier, known_since, last_execution, item, after))
        for item in items:
            if item.identifier not in seen:
                after = _next_run(item, now, timedelta(days=8))
                rows.append(CronRow(item.identifier, None, None, item, after))
        rows.sort(key=lambda row: row.identifier)
        return rows, now
