"""What is added and asked for: ``JobSpec``, ``RawJobSpec``, ``JobKeyMode`` and options."""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .errors import InvalidJobSpec

__all__ = [
    "CleanupTask",
    "JobKeyMode",
    "JobSpec",
    "RawJobSpec",
    "RescheduleJobOptions",
]


class JobKeyMode(str, enum.Enum):
    """How adding a job whose ``job_key`` already exists behaves.

    See the state table in the documentation: ``REPLACE`` overwrites a waiting job
    (new ``run_at``), ``PRESERVE_RUN_AT`` keeps the scheduled time of a never-attempted
    job, ``UNSAFE_DEDUPE`` leaves any existing job as it is (single adds only).
    """

    REPLACE = "replace"
    PRESERVE_RUN_AT = "preserve_run_at"
    UNSAFE_DEDUPE = "unsafe_dedupe"


class CleanupTask(str, enum.Enum):
    """Maintenance tasks of :meth:`WorkerUtils.cleanup`."""

    GC_TASK_IDENTIFIERS = "GC_TASK_IDENTIFIERS"
    """Delete task identifiers no job refers to (keeping those of known handlers)."""
    GC_JOB_QUEUES = "GC_JOB_QUEUES"
    """Delete unlocked queue rows no job refers to."""
    DELETE_PERMANENTLY_FAILED_JOBS = "DELETE_PERMANENTLY_FAILED_JOBS"
    """Delete unlocked jobs that have used all their attempts."""


@dataclass(frozen=True)
class JobSpec:
    """Options of one job; every field left ``None`` takes the database's default.

    Defaults (applied by SQL, as in Node): no queue, ``run_at`` = now, 25 attempts,
    priority 0 (lower runs first), no key, no flags. A field of the wrong type raises
    :class:`~sqla_graphile.errors.InvalidJobSpec` here; ``flags`` are kept as a tuple.
    """

    queue_name: str | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    job_key_mode: JobKeyMode | str | None = None
    priority: int | None = None
    flags: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise ValueError("JobSpec.run_at must be timezone-aware (e.g. datetime.now(UTC))")
        # Wrong types fail here, named, rather than as a driver error or (a string of
        # flags taken for a list of one-letter flags) not at all.
        if not (self.queue_name is None or isinstance(self.queue_name, str)):
            raise InvalidJobSpec(_wrong_type("queue_name", "a string", self.queue_name))
        if not (self.job_key is None or isinstance(self.job_key, str)):
            raise InvalidJobSpec(_wrong_type("job_key", "a string", self.job_key))
        if not (self.max_attempts is None or isinstance(self.max_attempts, int)):
            object.__setattr__(self, "max_attempts", _integer("max_attempts", self.max_attempts))
        if not (self.priority is None or isinstance(self.priority, int)):
            object.__setattr__(self, "priority", _integer("priority", self.priority))
        if self.flags is not None:
            object.__setattr__(self, "flags", _flag_list(self.flags))

    @property
    def key_mode(self) -> str | None:
        """The key mode as the SQL function expects it (``None`` means replace)."""
        mode = self.job_key_mode
        return mode.value if isinstance(mode, JobKeyMode) else mode


def _wrong_type(field: str, expected: str, value: object) -> str:
    return f"JobSpec.{field} must be {expected}, not {type(value).__name__}"


def _integer(field: str, value: object) -> int:
    """``value`` as an ``int`` if it is one in disguise (a NumPy integer, say)."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidJobSpec(_wrong_type(field, "an integer", value)) from None


def _flag_list(flags: object) -> tuple[str, ...]:
    if isinstance(flags, (str, bytes)) or not isinstance(flags, Iterable):
        raise InvalidJobSpec(_wrong_type("flags", "a list of strings", flags))
    listed = tuple(flags)
    for flag in listed:
        if not isinstance(flag, str):
            raise InvalidJobSpec(f"JobSpec.flags must hold strings, not {type(flag).__name__}")
    return listed


#: The options of a job that sets none. ``JobSpec`` is frozen: one instance serves all.
DEFAULT_SPEC = JobSpec()


@dataclass(frozen=True)
class RawJobSpec:
    """A job for :meth:`WorkerUtils.add_raw_jobs`: identifier, JSON payload and options."""

    identifier: str
    payload: Any = None
    spec: JobSpec = DEFAULT_SPEC


@dataclass(frozen=True)
class RescheduleJobOptions:
    """Fields to change with :meth:`WorkerUtils.reschedule_jobs`; ``None`` leaves one alone.

    Without ``run_at`` the jobs become runnable now (the database's clock).
    ``run_at`` may also be a :class:`~datetime.timedelta` from now.
    """

    run_at: datetime | timedelta | None = None
    priority: int | None = None
    attempts: int | None = None
    max_attempts: int | None = None
