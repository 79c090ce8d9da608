"""Crash recovery: the heartbeat registry and the sweeps of dead workers' locks.

The semantics are described in :mod:`sqla_graphile.recovery`.
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    Boolean,
    Interval,
    Text,
    bindparam,
    delete,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert

from ..schema import WorkerSchema
from .common import lock_expired

__all__ = ["RECOVERED_ERROR", "RecoveryStatements"]

#: ``last_error`` of a job recovered from a dead worker.
RECOVERED_ERROR = "Job recovered after worker {worker_id} stopped heartbeating"


class RecoveryStatements:
    """The statements of recovery for one worker schema."""

    def __init__(self, schema: WorkerSchema) -> None:
        workers = schema.worker_registry
        jobs, queues = schema.private_jobs, schema.private_job_queues
        now = func.now()
        threshold = bindparam("threshold", type_=Interval)
        dead_ids = bindparam("dead", type_=ARRAY(Text))

        self.sweep_lock = select(
            func.pg_try_advisory_xact_lock(func.hashtext(f"sqla_graphile.sweep:{schema.name}"))
        )
        self.list_workers = select(
            workers.c.worker_id,
            workers.c.started_at,
            workers.c.last_heartbeat_at,
            workers.c.metadata,
            (workers.c.last_heartbeat_at < now - threshold).label("is_stale"),
            (now - workers.c.last_heartbeat_at).label("heartbeat_age"),
        ).order_by(workers.c.last_heartbeat_at.desc(), workers.c.worker_id)
        # FOR UPDATE: a heartbeat in flight makes the sweep wait and re-check the row
        # (the worker is alive after all), and a heartbeat arriving after the row is
        # judged waits for the sweep, then finds the row gone and re-registers loudly.
        self.dead_workers = (
            select(workers.c.worker_id)
            .where(
                workers.c.last_heartbeat_at < now - threshold,
                workers.c.worker_id.is_distinct_from(bindparam("sweeper", type_=Text)),
            )
            .order_by(workers.c.worker_id)
            .with_for_update(of=workers)
        )

        registered = exists().where(workers.c.worker_id == jobs.c.locked_by)
        queue_registered = exists().where(workers.c.worker_id == queues.c.locked_by)
        # Unregistered holders past Node's expiry; their ids are listed for the report.
        self.expired_holders = (
            select(jobs.c.locked_by)
            .where(lock_expired(jobs.c.locked_at), ~registered)
            .union(
                select(queues.c.locked_by).where(
                    lock_expired(queues.c.locked_at), ~queue_registered
                )
            )
        )
        dead_job = jobs.c.locked_by == func.any(dead_ids)
        expired_job = lock_expired(jobs.c.locked_at) & ~registered
        self.jobs_to_recover = (
            select(jobs.c.id).where(or_(dead_job, expired_job)).order_by(jobs.c.id)
        )
        dead_queue = queues.c.locked_by == func.any(dead_ids)
        expired_queue = lock_expired(queues.c.locked_at) & ~queue_registered
        self.queues_to_recover = (
            select(queues.c.queue_name)
            .where(or_(dead_queue, expired_queue))
            .order_by(queues.c.queue_name)
        )
        delay = bindparam("delay", type_=Interval)
        self.recover_dead_jobs = (
            update(jobs)
            .where(dead_job)
            .values(
                locked_at=None,
                locked_by=None,
                run_at=func.greatest(jobs.c.run_at, now + delay),
                last_error=func.replace(
                    literal(RECOVERED_ERROR.replace("{worker_id}", "@W")), "@W", jobs.c.locked_by
                ),
            )
            .returning(jobs.c.id)
        )
        # Node's own sweep: unlock, run no earlier than now, the attempt stays used.
        self.recover_expired_jobs = (
            update(jobs)
            .where(expired_job)
            .values(locked_at=None, locked_by=None, run_at=func.greatest(jobs.c.run_at, now))
            .returning(jobs.c.id)
        )
        self.unlock_queues = (
            update(queues)
            .where(or_(dead_queue, expired_queue))
            .values(locked_at=None, locked_by=None)
            .returning(queues.c.queue_name)
        )
        self.delete_workers = delete(workers).where(workers.c.worker_id == func.any(dead_ids))

        worker_id = bindparam("worker_id", type_=Text)
        meta = bindparam("metadata", type_=postgresql.JSONB(none_as_null=True))
        upsert = insert(workers).values(worker_id=worker_id, metadata=meta)
        self.heartbeat = upsert.on_conflict_do_update(
            index_elements=[workers.c.worker_id],
            set_={
                "last_heartbeat_at": now,
                "metadata": func.coalesce(upsert.excluded.metadata, workers.c.metadata),
            },
        ).returning(
            # True when the row was inserted: on a heartbeat, a sweep had removed it.
            literal_column("(xmax = 0)", Boolean).label("inserted")
        )
        # A worker leaving with locks still held (outcomes it could not write) keeps its
        # row: the row goes stale and a sweep recovers those jobs after the threshold,
        # instead of after Node's 4 hours as for an unregistered holder.
        self.deregister = (
            delete(workers)
            .where(
                workers.c.worker_id == worker_id,
                ~exists().where(jobs.c.locked_by == worker_id),
                ~exists().where(queues.c.locked_by == worker_id),
            )
            .returning(workers.c.worker_id)
        )
