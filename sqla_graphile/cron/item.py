"""A cron item (:class:`Cron`), and the stamp its jobs carry (:class:`CronInfo`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..codec import encode_json_value
from ..durations import parse_time_phrase
from ..errors import CrontabError, InvalidArgument, PayloadNotSerializable
from ..specs import JobKeyMode, unstorable
from .fields import Schedule, parse_schedule, utc_minute

#: The payload key under which the scheduler stamps a cron job's minute (as Node does).
CRON_KEY = "_cron"
_SMALLINT = (-32768, 32767)
_MAX_NAME = 128


def format_timestamp(instant: datetime) -> str:
    """``instant`` in UTC as JavaScript's ``Date.prototype.toISOString`` writes it.

    For example ``2026-11-28T14:41:00.000Z`` (milliseconds, truncated, and ``Z``).
    """
    if instant.tzinfo is None:
        raise InvalidArgument("format_timestamp needs an aware datetime")
    utc = instant.astimezone(timezone.utc)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def parse_zone(value: str | ZoneInfo | None, where: str, line: int | None) -> ZoneInfo | None:
    """The time zone ``value`` names; a :class:`CrontabError` says ``where`` if none does."""
    if value is None or isinstance(value, ZoneInfo):
        return value
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise CrontabError(
            f"{where}, timezone: unknown time zone {value!r} ({exc})", line=line, field="timezone"
        ) from None


# -- a cron job's stamp ----------------------------------------------------------------


@dataclass(frozen=True)
class CronInfo:
    """What the scheduler stamped on a job it added: the ``_cron`` key of its payload.

    A handler reads it as :attr:`WorkerContext.cron <sqla_graphile.WorkerContext.cron>`
    (``None`` for a job no crontab added). Jobs added by Node's cron carry the same stamp.
    """

    ts: datetime
    """The minute the job was scheduled for (aware, UTC); also the job's ``run_at``."""
    backfilled: bool
    """Whether the minute was scheduled after it passed, by backfilling (``fill``)."""

    @classmethod
    def from_payload(cls, payload: Any) -> CronInfo | None:
        """The stamp in a job payload, or ``None`` if it has none (or a malformed one)."""
        if not isinstance(payload, Mapping):
            return None
        stamp = payload.get(CRON_KEY)
        if not isinstance(stamp, Mapping):
            return None
        ts, backfilled = stamp.get("ts"), stamp.get("backfilled", False)
        if not isinstance(ts, str) or not isinstance(backfilled, bool):
            return None
        # JavaScript's toISOString ends in "Z", which fromisoformat reads from 3.11 only.
        try:
            instant = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith("Z") else ts)
        except ValueError:
            return None
        if instant.tzinfo is None:
            return None
        return cls(instant.astimezone(timezone.utc), backfilled)


# -- the item --------------------------------------------------------------------------


class Cron:
    """One recurring job: a schedule, a task, and how its jobs are added.

    ``schedule`` holds the five time fields (``"0 4 * * *"``). ``id`` is the item's
    identifier in ``_private_known_crontabs`` (default: the task identifier; it must be
    unique in a crontab and shared by every process running the same item). ``fill`` is
    the backfill window (a :class:`~datetime.timedelta` or a time phrase like ``"2d"``):
    after downtime, the minutes missed within it are still scheduled, flagged
    ``backfilled``. ``max_attempts``, ``queue``, ``job_key``, ``job_key_mode`` and
    ``priority`` go to ``add_job``; ``job_key_mode`` defaults to ``"replace"`` when a
    key is given. ``payload`` is a JSON object, checked and converted as ``add_job``
    does (values PostgreSQL cannot store, such as a NUL character, are refused here);
    each job's payload is it plus ``_cron: {ts, backfilled}``. ``timezone`` (a
    ``zoneinfo`` name) reads the fields on that zone's wall clock instead of UTC.
    """

    __slots__ = (
        "_schedule",
        "fill",
        "identifier",
        "job_key",
        "job_key_mode",
        "line",
        "max_attempts",
        "payload",
        "priority",
        "queue",
        "schedule",
        "task",
        "timezone",
    )

    schedule: str
    task: str
    identifier: str
    fill: timedelta
    max_attempts: int | None
    queue: str | None
    job_key: str | None
    job_key_mode: str | None
    priority: int | None
    payload: dict[str, Any]
    timezone: ZoneInfo | None
    line: int | None
    """The crontab line the item was read from (``None`` for an item made in Python)."""
    _schedule: Schedule

    def __init__(
        self,
        schedule: str,
        task: str,
        *,
        id: str | None = None,
        fill: timedelta | str | None = None,
        max_attempts: int | None = None,
        queue: str | None = None,
        job_key: str | None = None,
        job_key_mode: JobKeyMode | str | None = None,
        priority: int | None = None,
        payload: Mapping[str, Any] | None = None,
        timezone: str | ZoneInfo | None = None,
        _line: int | None = None,
    ) -> None:
        line = _line
        label = f"line {line} of crontab" if line is not None else f"cron item {task!r}"
        if not isinstance(schedule, str):
            raise CrontabError(f"{label}: the schedule must be a string", line=line)
        fields = schedule.split()
        if len(fields) != 5:
            raise CrontabError(
                f"{label}, schedule: expected five fields (minute hour day-of-month month "
                f"day-of-week), got {schedule!r}",
                line=line,
                field="schedule",
            )

        def fail(name: str, message: str) -> CrontabError:
            return CrontabError(f"{label}, {name}: {message}", line=line, field=name)

        if not isinstance(task, str) or not task:
            raise fail("task", "the task identifier must be a non-empty string")
        if len(task) > _MAX_NAME:
            raise fail("task", f"the task identifier is longer than {_MAX_NAME} characters")
        identifier = task if id is None else id
        if not isinstance(identifier, str) or not identifier:
            raise fail("id", "the identifier must be a non-empty string")
        if isinstance(fill, str):
            try:
                fill = parse_time_phrase(fill)
            except ValueError as exc:
                raise fail("fill", str(exc)) from None
        fill = timedelta(0) if fill is None else fill
        if not isinstance(fill, timedelta) or fill < timedelta(0):
            raise fail("fill", "the backfill window must be a non-negative timedelta")
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= _SMALLINT[1]
        ):
            raise fail("max", f"max_attempts must be an integer from 1 to {_SMALLINT[1]}")
        if priority is not None and (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not _SMALLINT[0] <= priority <= _SMALLINT[1]
        ):
            raise fail(
                "priority", f"priority must be an integer from {_SMALLINT[0]} to {_SMALLINT[1]}"
            )
        if queue is not None and (not isinstance(queue, str) or not 0 < len(queue) <= _MAX_NAME):
            raise fail("queue", f"the queue name must be 1 to {_MAX_NAME} characters")
        if job_key is not None and (not isinstance(job_key, str) or not 0 < len(job_key) <= 512):
            raise fail("jobKey", "the job key must be 1 to 512 characters")
        # Text PostgreSQL refuses would fail the minute's statement, every minute.
        for name, what, value in (
            ("task", "task identifier", task),
            ("id", "identifier", identifier),
            ("queue", "queue name", queue),
            ("jobKey", "job key", job_key),
        ):
            if value is not None and (problem := unstorable(f"the {what}", value)):
                raise fail(name, problem)
        mode: str | None
        if job_key_mode is None:
            mode = JobKeyMode.REPLACE.value if job_key is not None else None
        else:
            try:
                mode = JobKeyMode(job_key_mode).value
            except ValueError:
                raise fail(
                    "jobKeyMode",
                    f"unknown job key mode {job_key_mode!r}; expected "
                    + ", ".join(repr(m.value) for m in JobKeyMode),
                ) from None
        if payload is None:
            payload = {}
        if not isinstance(payload, Mapping):
            raise fail("payload", "the payload must be a JSON object (a mapping)")
        # add_job's codec, so a payload is refused (or converted) exactly as add_job would.
        try:
            encoded = encode_json_value(dict(payload))
        except PayloadNotSerializable as exc:
            raise fail("payload", str(exc)) from None
        payload_dict: dict[str, Any] = json.loads(encoded)

        set_ = object.__setattr__
        set_(self, "_schedule", parse_schedule(fields, line=line, where=label))
        set_(self, "schedule", " ".join(fields))
        set_(self, "task", task)
        set_(self, "identifier", identifier)
        set_(self, "fill", fill)
        set_(self, "max_attempts", max_attempts)
        set_(self, "queue", queue)
        set_(self, "job_key", job_key)
        set_(self, "job_key_mode", mode)
        set_(self, "priority", priority)
        set_(self, "payload", payload_dict)
        set_(self, "timezone", parse_zone(timezone, label, line))
        set_(self, "line", line)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Cron items are immutable")

    def _key(self) -> tuple[Any, ...]:
        return (
            self.schedule,
            self.task,
            self.identifier,
            self.fill,
            self.max_attempts,
            self.queue,
            self.job_key,
            self.job_key_mode,
            self.priority,
            json.dumps(self.payload, sort_keys=True),
            self.timezone.key if self.timezone else None,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cron) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [repr(self.schedule), f"task={self.task!r}"]
        if self.identifier != self.task:
            parts.append(f"id={self.identifier!r}")
        for name in ("fill", "max_attempts", "queue", "job_key", "job_key_mode", "priority"):
            value = getattr(self, name)
            if value is not None and value != timedelta(0):
                parts.append(f"{name}={value!r}")
        if self.payload:
            parts.append(f"payload={self.payload!r}")
        if self.timezone is not None:
            parts.append(f"timezone={self.timezone.key!r}")
        return f"Cron({', '.join(parts)})"

    # -- matching ---------------------------------------------------------------------

    def matches(self, instant: datetime) -> bool:
        """Whether the minute holding ``instant`` (an aware datetime) is one of this item's.

        Seconds are ignored. Without a time zone the fields are read in UTC, as Node does.
        With one, they are read on that zone's wall clock, and daylight-saving changes
        are handled as cron daemons do for items whose hour field is restricted: a time
        skipped by a spring-forward change fires at the first minute after the gap, and
        a time repeated by a fall-back change fires only on its first pass. Items running
        every hour simply follow the wall clock through the change.
        """
        if instant.tzinfo is None or instant.utcoffset() is None:
            raise InvalidArgument("Cron.matches needs an aware datetime (for example in UTC)")
        return self._schedule.matches(utc_minute(instant), self.timezone)

    def job_payload(self, ts: datetime, *, backfilled: bool = False) -> dict[str, Any]:
        """The payload of this item's job for minute ``ts``: the payload plus ``_cron``."""
        return {**self.payload, CRON_KEY: {"ts": format_timestamp(ts), "backfilled": backfilled}}
