"""Worker recovery: the heartbeat registry, stale-worker sweeps, and their options.

Workers with recovery enabled register a row in ``<schema>._sqla_graphile_workers`` and
heartbeat it. A sweep (any worker's, or an operator's through ``WorkerUtils``) treats a
registered worker whose heartbeat is older than the threshold as dead and recovers its
jobs: unlocked, the attempt it used kept (as Node's 4-hour rule keeps it, so a job that
kills its worker reaches ``max_attempts`` instead of looping), ``run_at`` pushed to at
least now plus the recovery delay, ``last_error`` noting the interruption; its queues are
unlocked and its row removed.

A worker's own sweep begins, in its transaction, with the sweeper's own heartbeat, and
never judges the sweeper itself: a worker coming back from a partition cannot sweep
itself or sweep before it has proved that it reaches the database.

Lock holders that never registered (Node workers, our workers without recovery) cannot
be judged by heartbeat; they are recovered only under Node's own rule, once their lock is
more than 4 hours old, so a live Node worker's long job is never run twice at once.

Only one sweep runs at a time across the cluster (a transaction-scoped advisory lock); a
sweep that finds another one running says so (:attr:`SweepResult.already_running`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    Column,
    DateTime,
    Interval,
    PrimaryKeyConstraint,
    Table,
    Text,
    bindparam,
    delete,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert

from ._ops import Op
from .errors import InvalidArgument
from .schema import worker_schema

__all__ = [
    "NODE_LOCK_EXPIRY",
    "RECOVERED_ERROR",
    "ActiveWorker",
    "SweepResult",
    "SweepStaleWorkersOptions",
    "WorkerRecoveryConfig",
    "registry_table",
]

#: Node graphile-worker's hard-coded lock expiry, applied to holders without heartbeats.
NODE_LOCK_EXPIRY = timedelta(hours=4)
#: ``last_error`` of a job recovered from a dead worker.
RECOVERED_ERROR = "Job recovered after worker {worker_id} stopped heartbeating"

_TIMESTAMPTZ = DateTime(timezone=True)


@dataclass(frozen=True)
class WorkerRecoveryConfig:
    """Recovery settings of a worker (and defaults of manual sweeps).

    A worker's recovery is on by default (where the schema has the worker registry);
    ``enabled=False`` turns it off. With ``enabled`` the worker registers before
    fetching, heartbeats every ``heartbeat_interval`` (retrying through transient
    errors), sweeps every ``sweep_interval``, and deregisters on a clean exit.
    ``sweep_threshold`` is the heartbeat age after which a worker is dead;
    ``recovery_delay`` how long its jobs wait before running again.
    """

    enabled: bool = True
    heartbeat_interval: timedelta = timedelta(seconds=30)
    sweep_interval: timedelta = timedelta(seconds=60)
    sweep_threshold: timedelta = timedelta(minutes=5)
    recovery_delay: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "sweep_interval", "sweep_threshold"):
            if getattr(self, name) <= timedelta(0):
                raise InvalidArgument(f"WorkerRecoveryConfig.{name} must be positive")
        if self.recovery_delay < timedelta(0):
            raise InvalidArgument("WorkerRecoveryConfig.recovery_delay must not be negative")
        if self.heartbeat_interval >= self.sweep_threshold:
            raise InvalidArgument(
                "WorkerRecoveryConfig.heartbeat_interval must be shorter than sweep_threshold, "
                "or live workers would be judged dead"
            )

    def with_options(self, **changes: Any) -> WorkerRecoveryConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class SweepStaleWorkersOptions:
    """Options of one sweep; ``None`` takes the value from the recovery config."""

    sweep_threshold: timedelta | None = None
    recovery_delay: timedelta | None = None
    dry_run: bool = False

    def __post_init__(self) -> None:
        # A zero or negative threshold would judge every live worker dead.
        if self.sweep_threshold is not None and self.sweep_threshold <= timedelta(0):
            raise InvalidArgument("SweepStaleWorkersOptions.sweep_threshold must be positive")
        if self.recovery_delay is not None and self.recovery_delay < timedelta(0):
            raise InvalidArgument("SweepStaleWorkersOptions.recovery_delay must not be negative")


@dataclass(frozen=True)
class SweepResult:
    """What a sweep recovered (or, with ``dry_run``, would recover)."""

    worker_ids: list[str] = field(default_factory=list)
    """Dead registered workers, then unregistered holders past the 4-hour expiry."""
    job_ids: list[int] = field(default_factory=list)
    """The jobs unlocked (or that would be)."""
    queue_names: list[str] = field(default_factory=list)
    """The queues unlocked (or that would be)."""
    dry_run: bool = False
    already_running: bool = False
    """Another sweep held the cluster-wide sweep lock: this one did nothing."""

    @property
    def recovered_count(self) -> int:
        """Number of jobs recovered."""
        return len(self.job_ids)


@dataclass(frozen=True)
class ActiveWorker:
    """A registered worker, with staleness judged by the database clock."""

    worker_id: str
    started_at: datetime
    last_heartbeat_at: datetime
    metadata: Mapping[str, Any] | None
    is_stale: bool
    heartbeat_age: timedelta


@functools.lru_cache(maxsize=64)
def registry_table(schema: str) -> Table:
    """The Core table of the worker registry in ``schema``."""
    metadata = worker_schema(schema).metadata
    existing = metadata.tables.get(f"{schema}._sqla_graphile_workers")
    if existing is not None:
        return existing
    return Table(
        "_sqla_graphile_workers",
        metadata,
        Column("worker_id", Text, nullable=False),
        Column("started_at", _TIMESTAMPTZ, nullable=False, server_default=text("now()")),
        Column("last_heartbeat_at", _TIMESTAMPTZ, nullable=False, server_default=text("now()")),
        Column("metadata", postgresql.JSONB, nullable=True),
        PrimaryKeyConstraint("worker_id", name="_sqla_graphile_workers_pkey"),
    )


class RecoveryStatements:
    """The statements of recovery for one worker schema (built once per schema)."""

    def __init__(self, schema: str) -> None:
        ws = worker_schema(schema)
        workers = registry_table(schema)
        jobs, queues = ws.private_jobs, ws.private_job_queues
        now = func.now()
        threshold = bindparam("threshold", type_=Interval)
        dead_ids = bindparam("dead", type_=ARRAY(Text))
        node_expiry = literal(NODE_LOCK_EXPIRY, Interval)

        self.sweep_lock = select(
            func.pg_try_advisory_xact_lock(func.hashtext(f"sqla_graphile.sweep:{schema}"))
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
            .where(jobs.c.locked_at < now - node_expiry, ~registered)
            .union(
                select(queues.c.locked_by).where(
                    queues.c.locked_at < now - node_expiry, ~queue_registered
                )
            )
        )
        dead_job = jobs.c.locked_by == func.any(dead_ids)
        expired_job = (jobs.c.locked_at < now - node_expiry) & ~registered
        self.jobs_to_recover = (
            select(jobs.c.id).where(or_(dead_job, expired_job)).order_by(jobs.c.id)
        )
        dead_queue = queues.c.locked_by == func.any(dead_ids)
        expired_queue = (queues.c.locked_at < now - node_expiry) & ~queue_registered
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


@functools.lru_cache(maxsize=64)
def recovery_statements(schema: str) -> RecoveryStatements:
    """The recovery statements of the worker schema called ``schema``."""
    return RecoveryStatements(schema)


def worker_metadata(worker_id: str, tasks: Sequence[str]) -> dict[str, Any]:
    """The metadata a worker registers: pid, host, tasks, library version."""
    import os
    import socket

    from ._version import __version__

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "tasks": sorted(tasks),
        "version": __version__,
        "worker_id": worker_id,
    }


# -- operations (driven by WorkerUtils / AsyncWorkerUtils and the worker) ----------------


def list_active_workers_op(schema: str, threshold: timedelta) -> Op[list[ActiveWorker]]:
    """All registered workers, most recent heartbeat first, staleness by the DB clock."""
    result = yield recovery_statements(schema).list_workers, {"threshold": threshold}
    return [ActiveWorker(**row) for row in result.mappings()]


def sweep_op(
    schema: str,
    config: WorkerRecoveryConfig,
    options: SweepStaleWorkersOptions,
    *,
    sweeper: str | None = None,
) -> Op[SweepResult]:
    """Recover the jobs of dead workers (see the module's documentation).

    ``sweeper``: the worker sweeping, never judged dead by its own sweep (it heartbeats
    in the same transaction first; see :func:`heartbeat_then_sweep_op`).
    """
    sql = recovery_statements(schema)
    threshold = (
        options.sweep_threshold if options.sweep_threshold is not None else config.sweep_threshold
    )
    delay = options.recovery_delay if options.recovery_delay is not None else config.recovery_delay
    got_lock = (yield sql.sweep_lock, {}).scalar()
    if not got_lock:
        return SweepResult(dry_run=options.dry_run, already_running=True)
    dead = list((yield sql.dead_workers, {"threshold": threshold, "sweeper": sweeper}).scalars())
    expired = sorted(
        holder
        for holder in (yield sql.expired_holders, {}).scalars()
        if holder is not None and holder not in dead
    )
    if options.dry_run:
        job_ids = list((yield sql.jobs_to_recover, {"dead": dead}).scalars())
        queue_names = list((yield sql.queues_to_recover, {"dead": dead}).scalars())
        return SweepResult(dead + expired, job_ids, queue_names, dry_run=True)
    recovered = list((yield sql.recover_dead_jobs, {"dead": dead, "delay": delay}).scalars())
    recovered += (yield sql.recover_expired_jobs, {}).scalars()
    queue_names = sorted((yield sql.unlock_queues, {"dead": dead}).scalars())
    if dead:
        yield sql.delete_workers, {"dead": dead}
    return SweepResult(dead + expired, sorted(recovered), queue_names)


def heartbeat_then_sweep_op(
    schema: str,
    config: WorkerRecoveryConfig,
    worker_id: str,
    metadata: Mapping[str, Any] | None,
) -> Op[tuple[bool, SweepResult]]:
    """A registered worker's sweep: its heartbeat, then the sweep, in one transaction.

    A sweep runs only once the sweeper's own heartbeat succeeded. Returns whether the
    heartbeat had to create the row (as :func:`heartbeat_op`) and the sweep's result.
    """
    inserted = yield from heartbeat_op(schema, worker_id, metadata)
    result = yield from sweep_op(schema, config, SweepStaleWorkersOptions(), sweeper=worker_id)
    return inserted, result


def heartbeat_op(schema: str, worker_id: str, metadata: Mapping[str, Any] | None) -> Op[bool]:
    """Register or heartbeat ``worker_id``; returns True when the row had to be created."""
    result = yield (
        recovery_statements(schema).heartbeat,
        {
            "worker_id": worker_id,
            "metadata": dict(metadata) if metadata is not None else None,
        },
    )
    return bool(result.scalar())


def deregister_op(schema: str, worker_id: str) -> Op[bool]:
    """Remove ``worker_id``'s registry row on a clean exit; True when it was removed.

    The row stays while ``worker_id`` still holds a job or queue lock, so that a sweep
    recovers those once the row is stale.
    """
    result = yield recovery_statements(schema).deregister, {"worker_id": worker_id}
    return result.first() is not None
