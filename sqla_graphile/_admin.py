"""Read-side operations for operators: list and show jobs, lock holders, queue statistics.

Like :mod:`sqla_graphile._ops` these are operations (:mod:`sqla_graphile._drive`)
driven by either utils twin; their statements are in :mod:`sqla_graphile.sql.admin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ._drive import Op
from .admin import JobState, LockHolder, QueueStats, WorkerStats
from .errors import InvalidArgument
from .job import Job
from .sql import statements

# The public types live in sqla_graphile.admin; they are re-exported for older imports.
__all__ = [
    "JobState",
    "LockHolder",
    "QueueStats",
    "WorkerStats",
    "get_job_op",
    "list_jobs_op",
    "lock_holders_op",
    "state_of",
    "stats_op",
]


def state_of(
    locked_at: datetime | None, attempts: int, max_attempts: int, run_at: datetime, now: datetime
) -> JobState:
    """A job's state as :class:`~sqla_graphile.admin.JobState` names it (rows or ``Job``)."""
    if locked_at is not None:
        return JobState.LOCKED
    if attempts >= max_attempts:
        return JobState.FAILED
    return JobState.READY if run_at <= now else JobState.SCHEDULED


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
    try:
        state = JobState(state)
    except ValueError:
        known = ", ".join(repr(s.value) for s in JobState)
        raise InvalidArgument(f"unknown job state {state!r}; expected one of {known}") from None
    if limit is not None and limit < 0:
        raise InvalidArgument("limit must not be negative")
    if offset < 0:
        raise InvalidArgument("offset must not be negative")
    query = statements(schema).admin.list_jobs(
        state, by_task=task_identifier is not None, by_queue=queue_name is not None
    )
    params = {
        "task_identifier": task_identifier,
        "queue_name": queue_name,
        # As SQLAlchemy's .limit() and .offset() read them; a NULL limit is no limit.
        "limit": None if limit is None else int(limit),
        "offset": int(offset),
    }
    result = yield query, params
    return [_job(row) for row in result.mappings()]


def get_job_op(schema: str, job_id: int) -> Op[Job | None]:
    """One job by id, with its payload, or ``None``."""
    result = yield statements(schema).admin.get_job, {"id": int(job_id)}
    row = result.mappings().one_or_none()
    return _job(row) if row is not None else None


def lock_holders_op(schema: str) -> Op[list[LockHolder]]:
    """Every ``locked_by`` on jobs and queues, oldest lock first."""
    result = yield statements(schema).admin.lock_holders, {}
    return [LockHolder(**row) for row in result.mappings()]


def stats_op(schema: str) -> Op[WorkerStats]:
    """Counts by state, per queue, and the oldest ready job's age."""
    sql = statements(schema).admin
    counts = (yield sql.counts, {}).mappings().one()
    queues = [QueueStats(**row) for row in (yield sql.queue_stats, {}).mappings()]
    return WorkerStats(**counts, queues=queues)
