"""Read-side operations for operators: list and show jobs, lock holders, queue statistics.

Like :mod:`sqla_graphile._ops` these are generators driven by either utils twin.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    and_,
    bindparam,
    func,
    literal,
    select,
    union_all,
)

from ._ops import Op
from .admin import JobState, LockHolder, QueueStats, WorkerStats
from .errors import InvalidArgument
from .job import Job
from .recovery import registry_table
from .schema import worker_schema

# The public types live in sqla_graphile.admin; they are re-exported for older imports.
__all__ = [
    "JobState",
    "LockHolder",
    "QueueStats",
    "WorkerStats",
    "get_job_op",
    "list_jobs_op",
    "lock_holders_op",
    "stats_op",
]


class _AdminStatements:
    def __init__(self, schema: str) -> None:
        ws = worker_schema(schema)
        jobs, tasks, queues = ws.private_jobs, ws.private_tasks, ws.private_job_queues
        now = func.now()
        self.jobs = jobs
        self.is_failed = and_(jobs.c.locked_at.is_(None), jobs.c.attempts >= jobs.c.max_attempts)
        self.is_locked = jobs.c.locked_at.is_not(None)
        available = and_(jobs.c.locked_at.is_(None), jobs.c.attempts < jobs.c.max_attempts)
        self.is_ready = and_(available, jobs.c.run_at <= now)
        self.is_scheduled = and_(available, jobs.c.run_at > now)
        self.base: Select[Any] = (
            select(
                *jobs.c,
                tasks.c.identifier.label("task_identifier"),
                queues.c.queue_name.label("queue_name"),
            )
            .join(tasks, tasks.c.id == jobs.c.task_id)
            .outerjoin(queues, queues.c.id == jobs.c.job_queue_id)
        )
        self.tasks, self.queues = tasks, queues

        def count(condition: Any) -> Any:
            return func.count().filter(condition)

        self.counts = select(
            count(self.is_ready).label("ready"),
            count(self.is_scheduled).label("scheduled"),
            count(self.is_locked).label("locked"),
            count(self.is_failed).label("failed"),
            func.count().label("total"),
            (now - func.min(jobs.c.run_at).filter(self.is_ready)).label("oldest_ready_age"),
        ).select_from(jobs)
        per_queue = (
            select(jobs.c.job_queue_id, func.count().label("jobs"))
            .group_by(jobs.c.job_queue_id)
            .subquery()
        )
        self.queue_stats = (
            select(
                queues.c.queue_name,
                func.coalesce(per_queue.c.jobs, 0).label("jobs"),
                queues.c.locked_by,
                queues.c.locked_at,
            )
            .outerjoin(per_queue, per_queue.c.job_queue_id == queues.c.id)
            .order_by(queues.c.queue_name)
        )
        workers = registry_table(schema)
        holders = union_all(
            select(
                jobs.c.locked_by.label("worker_id"),
                literal(1, Integer).label("job"),
                literal(0, Integer).label("queue"),
                jobs.c.locked_at,
            ).where(jobs.c.locked_by.is_not(None)),
            select(
                queues.c.locked_by,
                literal(0, Integer),
                literal(1, Integer),
                queues.c.locked_at,
            ).where(queues.c.locked_by.is_not(None)),
        ).subquery()
        grouped = (
            select(
                holders.c.worker_id,
                func.sum(holders.c.job).label("locked_jobs"),
                func.sum(holders.c.queue).label("locked_queues"),
                func.min(holders.c.locked_at).label("oldest_lock_at"),
            )
            .group_by(holders.c.worker_id)
            .subquery()
        )
        self.lock_holders = (
            select(
                grouped.c.worker_id,
                grouped.c.locked_jobs,
                grouped.c.locked_queues,
                grouped.c.oldest_lock_at,
                (workers.c.worker_id.is_not(None)).label("registered"),
                workers.c.last_heartbeat_at,
            )
            .outerjoin(workers, workers.c.worker_id == grouped.c.worker_id)
            .order_by(grouped.c.oldest_lock_at)
        )


@functools.lru_cache(maxsize=64)
def _statements(schema: str) -> _AdminStatements:
    return _AdminStatements(schema)


def _job(row: Mapping[Any, Any]) -> Job:
    return Job.from_row(row, task_identifier=row["task_identifier"], queue_name=row["queue_name"])


def list_jobs_op(
    schema: str,
    *,
    state: JobState | str = JobState.ALL,
    task_identifier: str | None = None,
    queue_name: str | None = None,
    limit: int | None = 100,
    offset: int = 0,
) -> Op[list[Job]]:
    """Jobs in a state, optionally of one task or queue, by priority then run time."""
    sql = _statements(schema)
    try:
        state = JobState(state)
    except ValueError:
        known = ", ".join(repr(s.value) for s in JobState)
        raise InvalidArgument(f"unknown job state {state!r}; expected one of {known}") from None
    if limit is not None and limit < 0:
        raise InvalidArgument("limit must not be negative")
    if offset < 0:
        raise InvalidArgument("offset must not be negative")
    query = sql.base
    condition = {
        JobState.READY: sql.is_ready,
        JobState.SCHEDULED: sql.is_scheduled,
        JobState.LOCKED: sql.is_locked,
        JobState.FAILED: sql.is_failed,
        JobState.ALL: None,
    }[state]
    if condition is not None:
        query = query.where(condition)
    if task_identifier is not None:
        query = query.where(sql.tasks.c.identifier == task_identifier)
    if queue_name is not None:
        query = query.where(sql.queues.c.queue_name == queue_name)
    query = query.order_by(sql.jobs.c.priority, sql.jobs.c.run_at, sql.jobs.c.id)
    query = query.limit(limit).offset(offset)
    result = yield query, {}
    return [_job(row) for row in result.mappings()]


def get_job_op(schema: str, job_id: int) -> Op[Job | None]:
    """One job by id, with its payload, or ``None``."""
    sql = _statements(schema)
    result = yield sql.base.where(sql.jobs.c.id == bindparam("id")), {"id": int(job_id)}
    row = result.mappings().one_or_none()
    return _job(row) if row is not None else None


def lock_holders_op(schema: str) -> Op[list[LockHolder]]:
    """Every ``locked_by`` on jobs and queues, oldest lock first."""
    result = yield _statements(schema).lock_holders, {}
    return [LockHolder(**row) for row in result.mappings()]


def stats_op(schema: str) -> Op[WorkerStats]:
    """Counts by state, per queue, and the oldest ready job's age."""
    sql = _statements(schema)
    counts = (yield sql.counts, {}).mappings().one()
    queues = [QueueStats(**row) for row in (yield sql.queue_stats, {}).mappings()]
    return WorkerStats(**counts, queues=queues)
