"""Managing jobs: the schema's admin functions, cleanups, and the operators' reads.

The writes (``remove_job``, ``complete_jobs`` …) call the schema's SQL functions, as
Node's utils do. The reads list jobs by state, count them, and name the lock holders.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    exists,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.sql.dml import Delete

from ..admin import JobState
from ..functions import WorkerFunctions
from ..schema import WorkerSchema
from .common import IDEMPOTENT_OPTION, TIMESTAMPTZ, job_rows

__all__ = ["AdminStatements", "state_conditions"]


def state_conditions(jobs: Any) -> dict[JobState, ColumnElement[bool]]:
    """The condition of each state but ALL, on the jobs table or a select of its columns."""
    available = and_(jobs.c.locked_at.is_(None), jobs.c.attempts < jobs.c.max_attempts)
    now = func.now()
    return {
        JobState.READY: and_(available, jobs.c.run_at <= now),
        JobState.SCHEDULED: and_(available, jobs.c.run_at > now),
        JobState.LOCKED: jobs.c.locked_at.is_not(None),
        JobState.FAILED: and_(jobs.c.locked_at.is_(None), jobs.c.attempts >= jobs.c.max_attempts),
    }


class AdminStatements:
    """The statements of job management for one worker schema."""

    def __init__(self, schema: WorkerSchema, fn: WorkerFunctions) -> None:
        jobs, tasks = schema.private_jobs, schema.private_tasks
        queues = schema.private_job_queues
        self.remove_job = job_rows(jobs, fn.remove_job(bindparam("job_key", type_=Text)))
        ids = bindparam("ids", type_=ARRAY(BigInteger))
        self.complete_jobs = job_rows(jobs, fn.complete_jobs(ids))
        self.permanently_fail_jobs = job_rows(
            jobs, fn.permanently_fail_jobs(ids, bindparam("reason", type_=Text))
        )
        self.reschedule_jobs = job_rows(
            jobs,
            fn.reschedule_jobs(
                ids,
                # Without a run_at the jobs become runnable now, by the database's clock.
                run_at=func.coalesce(bindparam("run_at", type_=TIMESTAMPTZ), func.now()),
                priority=bindparam("priority", type_=Integer),
                attempts=bindparam("attempts", type_=Integer),
                max_attempts=bindparam("max_attempts", type_=Integer),
            ),
        )
        self.now = select(func.now())
        self.force_unlock_workers = select(
            fn.force_unlock_workers(bindparam("worker_ids", type_=ARRAY(Text)))
        )
        self.delete_permanently_failed: Delete = jobs.delete().where(
            jobs.c.attempts >= jobs.c.max_attempts, jobs.c.locked_at.is_(None)
        )
        self.gc_task_identifiers: Delete = tasks.delete().where(
            ~exists().where(jobs.c.task_id == tasks.c.id),
            tasks.c.identifier != func.all(bindparam("keep", type_=ARRAY(Text))),
        )
        # NOT EXISTS, not NOT IN: jobs without a queue have a NULL job_queue_id, and
        # NOT IN over a NULL would keep every queue forever.
        self.gc_job_queues: Delete = queues.delete().where(
            queues.c.locked_at.is_(None),
            ~exists().where(jobs.c.job_queue_id == queues.c.id),
        )
        self._reads(schema)

    # -- the operators' reads -----------------------------------------------------------

    def _reads(self, schema: WorkerSchema) -> None:
        jobs, tasks = schema.private_jobs, schema.private_tasks
        queues, workers = schema.private_job_queues, schema.worker_registry
        now = func.now()
        self._jobs, self._tasks, self._queues = jobs, tasks, queues
        self._states = state_conditions(jobs)
        # Every column of the job, with its task's identifier and its queue's name.
        self._base: Select[Any] = (
            select(
                *jobs.c,
                tasks.c.identifier.label("task_identifier"),
                queues.c.queue_name.label("queue_name"),
            )
            .join(tasks, tasks.c.id == jobs.c.task_id)
            .outerjoin(queues, queues.c.id == jobs.c.job_queue_id)
        )
        self.get_job = self._base.where(jobs.c.id == bindparam("id", type_=BigInteger))

        def count(condition: Any) -> Any:
            return func.count().filter(condition)

        states = self._states
        self.counts = select(
            count(states[JobState.READY]).label("ready"),
            count(states[JobState.SCHEDULED]).label("scheduled"),
            count(states[JobState.LOCKED]).label("locked"),
            count(states[JobState.FAILED]).label("failed"),
            func.count().label("total"),
            (now - func.min(jobs.c.run_at).filter(states[JobState.READY])).label(
                "oldest_ready_age"
            ),
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

    @functools.cache  # noqa: B019 - one per schema, 20 variants at most
    def list_jobs(self, state: JobState, *, by_task: bool, by_queue: bool) -> Select[Any]:
        """Jobs in ``state`` by priority, run time and id; ``:limit`` (NULL: all), ``:offset``.

        ``by_task`` / ``by_queue``: only those of ``:task_identifier`` / ``:queue_name``.
        """
        query = self._base
        condition = self._states.get(state)
        if condition is not None:
            query = query.where(condition)
        if by_task:
            query = query.where(self._tasks.c.identifier == bindparam("task_identifier", Text))
        if by_queue:
            query = query.where(self._queues.c.queue_name == bindparam("queue_name", Text))
        jobs = self._jobs
        return (
            query.order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
            .limit(bindparam("limit", type_=Integer))
            .offset(bindparam("offset", type_=Integer))
            .execution_options(**{IDEMPOTENT_OPTION: True})  # a read
        )

    def variants(self) -> dict[str, Any]:
        """Every statement :meth:`list_jobs` builds, by name."""
        return {
            f"list_jobs[{state.value}{',task' * by_task}{',queue' * by_queue}]": self.list_jobs(
                state, by_task=by_task, by_queue=by_queue
            )
            for state in JobState
            for by_task in (False, True)
            for by_queue in (False, True)
        }
