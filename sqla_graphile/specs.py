"""What is added and asked for: ``JobSpec``, ``RawJobSpec``, ``JobKeyMode`` and options."""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import InvalidCharacter, InvalidJobSpec, InvalidMaxAttempts, ValueOutOfRange

__all__ = [
    "RUN_AT_RANGE",
    "SMALLINT_RANGE",
    "CleanupTask",
    "JobKeyMode",
    "JobSpec",
    "RawJobSpec",
    "RescheduleJobOptions",
    "check_run_at",
]

#: ``priority``, ``attempts`` and ``max_attempts`` are ``smallint`` columns.
SMALLINT_RANGE = (-32768, 32767)
#: The times a job may be set to run at, in UTC. PostgreSQL stores far more, but a row
#: is read back as a Python ``datetime`` (years 1 to 9999) in the session's time zone:
#: a day's margin at either end keeps every time zone within reach.
RUN_AT_RANGE = (
    datetime(1, 1, 2, tzinfo=timezone.utc),
    datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc),
)


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
    priority 0 (lower runs first), no key, no flags. Checked here, before anything is
    sent: a field of the wrong type or a naive ``run_at`` raises
    :class:`~sqla_graphile.errors.InvalidJobSpec`, a ``priority`` or ``max_attempts``
    outside ``smallint`` or a ``run_at`` outside :data:`RUN_AT_RANGE` raises
    :class:`~sqla_graphile.errors.ValueOutOfRange`, and ``max_attempts`` below 1
    :class:`~sqla_graphile.errors.InvalidMaxAttempts`. ``flags`` are kept as a tuple.
    """

    queue_name: str | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    job_key_mode: JobKeyMode | str | None = None
    priority: int | None = None
    flags: Sequence[str] | None = None

    def __post_init__(self) -> None:
        # Wrong types and out-of-range values fail here, named, rather than as a driver
        # error or (a string of flags taken for a list of one-letter flags) not at all.
        if self.run_at is not None:
            check_run_at("JobSpec.run_at", self.run_at)
        if not (self.queue_name is None or isinstance(self.queue_name, str)):
            raise InvalidJobSpec(_wrong_type("JobSpec.queue_name", "a string", self.queue_name))
        if not (self.job_key is None or isinstance(self.job_key, str)):
            raise InvalidJobSpec(_wrong_type("JobSpec.job_key", "a string", self.job_key))
        for field, text in (
            ("JobSpec.queue_name", self.queue_name),
            ("JobSpec.job_key", self.job_key),
        ):
            if text is not None:
                check_text(field, text)
        if self.max_attempts is not None:
            object.__setattr__(
                self, "max_attempts", _max_attempts("JobSpec.max_attempts", self.max_attempts)
            )
        if self.priority is not None:
            object.__setattr__(self, "priority", _smallint("JobSpec.priority", self.priority))
        if self.flags is not None:
            object.__setattr__(self, "flags", _flag_list(self.flags))

    @property
    def key_mode(self) -> str | None:
        """The key mode as the SQL function expects it (``None`` means replace)."""
        mode = self.job_key_mode
        return mode.value if isinstance(mode, JobKeyMode) else mode


def unstorable(what: str, text: str) -> str | None:
    """Why PostgreSQL could not store ``text`` (called ``what``), or ``None``.

    Its text type refuses NUL, and UTF-8 (the connection's encoding) cannot hold a lone
    surrogate. Checked before anything is sent, so a refused value aborts no transaction.
    """
    if "\0" in text:
        return f"{what} contains a NUL character (\\u0000), which PostgreSQL cannot store"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{what} contains a lone surrogate, which PostgreSQL cannot store"
    return None


def check_text(what: str, text: str) -> str:
    """``text`` if PostgreSQL can store it; else :class:`InvalidCharacter`."""
    if (problem := unstorable(what, text)) is not None:
        raise InvalidCharacter(problem)
    return text


def _wrong_type(field: str, expected: str, value: object) -> str:
    return f"{field} must be {expected}, not {type(value).__name__}"


def _integer(field: str, value: object) -> int:
    """``value`` as an ``int`` if it is one in disguise (a NumPy integer, say)."""
    if isinstance(value, int):
        return value
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidJobSpec(_wrong_type(field, "an integer", value)) from None


def _smallint(field: str, value: object) -> int:
    number = _integer(field, value)
    low, high = SMALLINT_RANGE
    if not low <= number <= high:
        raise ValueOutOfRange(f"{field} is out of range: {number} is not in {low}..{high}")
    return number


def _max_attempts(field: str, value: object) -> int:
    number = _smallint(field, value)
    if number < 1:
        raise InvalidMaxAttempts(f"{field} must be at least 1, not {number}")
    return number


def check_run_at(field: str, value: object) -> datetime:
    """``value`` if it is an aware ``datetime`` within :data:`RUN_AT_RANGE`.

    Raises :class:`~sqla_graphile.errors.InvalidJobSpec` for anything else (a naive
    time, another type) and :class:`~sqla_graphile.errors.ValueOutOfRange` outside
    the range, before anything is sent.
    """
    if not isinstance(value, datetime):
        raise InvalidJobSpec(_wrong_type(field, "a timezone-aware datetime", value))
    if value.utcoffset() is None:
        raise InvalidJobSpec(f"{field} must be timezone-aware (e.g. datetime.now(UTC))")
    low, high = RUN_AT_RANGE
    try:
        in_range = low <= value.astimezone(timezone.utc) <= high
    except OverflowError:  # within a few hours of year 1 or 9999, in UTC past them
        in_range = False
    if not in_range:
        raise ValueOutOfRange(
            f"{field} is out of range: {value.isoformat()} is not between "
            f"{low.isoformat()} and {high.isoformat()}"
        )
    return value


def _flag_list(flags: object) -> tuple[str, ...]:
    if isinstance(flags, (str, bytes)) or not isinstance(flags, Iterable):
        raise InvalidJobSpec(_wrong_type("JobSpec.flags", "a list of strings", flags))
    listed = tuple(flags)
    for flag in listed:
        if not isinstance(flag, str):
            raise InvalidJobSpec(f"JobSpec.flags must hold strings, not {type(flag).__name__}")
        check_text("JobSpec.flags", flag)
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
    """What :meth:`WorkerUtils.reschedule_jobs` sets on the jobs.

    ``run_at`` is when the jobs run next: an aware ``datetime``, or a
    :class:`~datetime.timedelta` added to the database's ``now()``; left ``None`` the
    jobs become runnable now, by the database's clock. ``priority``, ``attempts`` and
    ``max_attempts`` left ``None`` keep each job's own value. Wrong types and values out
    of range raise :class:`~sqla_graphile.errors.InvalidJobSpec` here.
    """

    run_at: datetime | timedelta | None = None
    priority: int | None = None
    attempts: int | None = None
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        name = "RescheduleJobOptions"
        if self.run_at is not None and not isinstance(self.run_at, timedelta):
            check_run_at(f"{name}.run_at", self.run_at)
        if self.priority is not None:
            object.__setattr__(self, "priority", _smallint(f"{name}.priority", self.priority))
        if self.attempts is not None:
            object.__setattr__(self, "attempts", _smallint(f"{name}.attempts", self.attempts))
        if self.max_attempts is not None:
            max_attempts = _max_attempts(f"{name}.max_attempts", self.max_attempts)
            object.__setattr__(self, "max_attempts", max_attempts)
