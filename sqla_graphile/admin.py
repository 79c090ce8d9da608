"""What the operator methods of the utils return: job states, statistics, lock holders.

:meth:`WorkerUtils.list_jobs <sqla_graphile.WorkerUtils.list_jobs>` takes a
:class:`JobState`, :meth:`~sqla_graphile.WorkerUtils.stats` returns
:class:`WorkerStats` (with a :class:`QueueStats` per named queue) and
:meth:`~sqla_graphile.WorkerUtils.lock_holders` a list of :class:`LockHolder`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["JobState", "LockHolder", "QueueStats", "WorkerStats"]


class JobState(str, enum.Enum):
    """A job's state as operators see it."""

    READY = "ready"
    """Unlocked, attempts left, due now."""
    SCHEDULED = "scheduled"
    """Unlocked, attempts left, due later (including retries waiting out their backoff)."""
    LOCKED = "locked"
    """Held by a worker (running, or its worker died)."""
    FAILED = "failed"
    """Permanently failed: no attempts left."""
    ALL = "all"
    """Every job, whatever its state."""


@dataclass(frozen=True)
class LockHolder:
    """A ``locked_by`` value seen on jobs or queues, and whether it heartbeats."""

    worker_id: str
    locked_jobs: int
    locked_queues: int
    oldest_lock_at: datetime
    registered: bool
    """Whether the worker is in the heartbeat registry (workers of this library are)."""
    last_heartbeat_at: datetime | None


@dataclass(frozen=True)
class QueueStats:
    """One named queue: its jobs, and who holds it."""

    queue_name: str
    jobs: int
    locked_by: str | None
    locked_at: datetime | None


@dataclass(frozen=True)
class WorkerStats:
    """Counts of jobs by state, per queue, and the age of the oldest ready job."""

    ready: int
    scheduled: int
    locked: int
    failed: int
    total: int
    oldest_ready_age: timedelta | None
    queues: list[QueueStats]
