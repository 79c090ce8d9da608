"""Queue health numbers per task and queue, from one aggregate query over the jobs table.

States are those of :class:`~sqla_graphile.admin.JobState` (what ``graphile-worker
list --state`` shows): *runnable* is ``ready``, *permanently failed* is ``failed``.
The query reads no payloads and touches each row once (one sequential scan, grouped by
task and queue ids); names are joined to the few groups afterwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Float, Select, and_, bindparam, cast, extract, func, select

from .schema import worker_schema

__all__ = ["QueueSample", "read_queue_samples"]


@dataclass(frozen=True)
class QueueSample:
    """The jobs of one task in one queue (``queue_name`` ``None``: no named queue).

    Ages are in seconds, ``None`` when there is no such job.
    """

    task_identifier: str
    queue_name: str | None
    runnable: int
    """Unlocked, attempts left, due now (``ready``)."""
    scheduled: int
    """Unlocked, attempts left, due later (retries waiting out their backoff included)."""
    locked: int
    """Held by a worker: running, queued in a worker's memory, or its worker died."""
    permanently_failed: int
    """Out of attempts, waiting for an operator."""
    oldest_runnable_age: float | None
    """How long the oldest runnable job has been due."""
    oldest_lock_age: float | None
    """How long the oldest lock on a job of this group has been held."""


@functools.lru_cache(maxsize=64)
def _statement(schema: str) -> Select[Any]:
    ws = worker_schema(schema)
    jobs, tasks, queues = ws.private_jobs, ws.private_tasks, ws.private_job_queues
    now = func.now()
    unlocked = jobs.c.locked_at.is_(None)
    available = and_(unlocked, jobs.c.attempts < jobs.c.max_attempts)
    ready = and_(available, jobs.c.run_at <= now)

    def count(condition: Any) -> Any:
        return func.count().filter(condition)

    def age(oldest: Any) -> Any:
        return cast(extract("epoch", now - oldest), Float)

    groups = (
        select(
            jobs.c.task_id,
            jobs.c.job_queue_id,
            count(ready).label("runnable"),
            count(and_(available, jobs.c.run_at > now)).label("scheduled"),
            count(jobs.c.locked_at.is_not(None)).label("locked"),
            count(and_(unlocked, jobs.c.attempts >= jobs.c.max_attempts)).label("failed"),
            age(func.min(jobs.c.run_at).filter(ready)).label("oldest_runnable_age"),
            age(func.min(jobs.c.locked_at)).label("oldest_lock_age"),
        )
        .group_by(jobs.c.task_id, jobs.c.job_queue_id)
        .subquery("groups")
    )
    return (
        select(
            tasks.c.identifier,
            queues.c.queue_name,
            groups.c.runnable,
            groups.c.scheduled,
            groups.c.locked,
            groups.c.failed,
            groups.c.oldest_runnable_age,
            groups.c.oldest_lock_age,
        )
        .select_from(groups)
        .join(tasks, tasks.c.id == groups.c.task_id)
        .outerjoin(queues, queues.c.id == groups.c.job_queue_id)
    )


def read_queue_samples(
    connection: Connection, schema: str, timeout: float | None = None
) -> list[QueueSample]:
    """One :class:`QueueSample` per task and queue with jobs, in one statement.

    ``timeout`` (seconds) bounds the statement (``SET LOCAL statement_timeout``), so a
    slow database delays a metrics collection by that much at most; the caller's
    transaction is the one it applies to.
    """
    if timeout is not None:
        connection.execute(
            select(func.set_config("statement_timeout", bindparam("ms"), True)),
            {"ms": str(max(1, int(timeout * 1000)))},
        )
    rows = connection.execute(_statement(schema))
    return [QueueSample(*row) for row in rows]
