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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table

from ._drive import Op
from .errors import InvalidArgument
from .schema import worker_schema
from .sql import statements
from .sql.common import NODE_LOCK_EXPIRY
from .sql.recovery import RECOVERED_ERROR

__all__ = [
    "NODE_LOCK_EXPIRY",
    "RECOVERED_ERROR",
    "ActiveWorker",
    "SweepResult",
    "SweepStaleWorkersOptions",
    "WorkerRecoveryConfig",
    "registry_table",
]


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


def registry_table(schema: str) -> Table:
    """The Core table of the worker registry in ``schema`` (see :class:`WorkerSchema`)."""
    return worker_schema(schema).worker_registry


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
    result = yield statements(schema).recovery.list_workers, {"threshold": threshold}
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
    sql = statements(schema).recovery
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
        statements(schema).recovery.heartbeat,
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
    result = yield statements(schema).recovery.deregister, {"worker_id": worker_id}
    return result.first() is not None
