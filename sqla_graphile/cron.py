"""Recurring jobs: Node graphile-worker's crontab, its matcher and its scheduler.

A crontab is text in the format of Node graphile-worker 0.18, one item a line::

    # ┌───────── minute (0-59)
    # │ ┌─────── hour (0-23)
    # │ │ ┌───── day of month (1-31)
    # │ │ │ ┌─── month (1-12)
    # │ │ │ │ ┌─ day of week (0-6, 0 and 7 = Sunday)
      0 4 * * * send_digest ?fill=2d&max=10 {onboarding: false}
      */15 * * * 1-5 poll_feeds ?id=feeds&queue=feeds&priority=-1

Each field is a comma list of numbers, ``a-b`` ranges, ``*`` and ``*/n`` (steps apply to
``*`` only, as in Node); then the task identifier; then optional query-string options
(``id``, ``fill``, ``max``, ``queue``, ``jobKey``, ``jobKeyMode``, ``priority``); then an
optional JSON5 object payload on the same line (comments, unquoted keys, single quotes,
trailing commas, hexadecimal numbers; ``NaN`` and ``Infinity`` are refused since JSON
cannot hold them, and NUL characters since PostgreSQL cannot). Times are UTC. The same
items can be written in Python::

    Cron("0 4 * * *", task="send_digest", fill=timedelta(days=2), max_attempts=10,
         payload={"onboarding": False})

Beyond Node, an item may carry a time zone (``Cron(..., timezone="Europe/Paris")``, or the
``tz=Europe/Paris`` option in text, which Node does not read): its fields are then read on
that zone's wall clock. Jobs are still stamped with UTC instants.

:class:`CronScheduler` schedules the items as Node's cron does, sharing
``_private_known_crontabs`` with any Node or Python process on the same schema, so that
each minute of an item is scheduled once between them all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Union
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    Text,
    bindparam,
    cast,
    column,
    func,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Executable

from ._urls import async_engine_from_url
from .codec import encode_json_value
from .errors import CrontabError, InvalidArgument, InvalidArgumentType, PayloadNotSerializable
from .functions import worker_functions
from .hooks import Hooks
from .schema import DEFAULT_SCHEMA, validate_schema_name, worker_schema
from .specs import JobKeyMode, unstorable

__all__ = [
    "CRON_KEY",
    "Cron",
    "CronInfo",
    "CronJobScheduledEvent",
    "CronScheduler",
    "CronTickEvent",
    "CrontabError",
    "CrontabSource",
    "format_timestamp",
    "load_crontab",
    "parse_crontab",
    "parse_crontab_file",
    "parse_time_phrase",
]

logger = logging.getLogger("sqla_graphile.cron")

ONE_MINUTE = timedelta(minutes=1)
#: The payload key under which the scheduler stamps a cron job's minute (as Node does).
CRON_KEY = "_cron"
_SMALLINT = (-32768, 32767)
_MAX_NAME = 128


# -- time fields -----------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    sunday_wrap: bool = False  # day of week: 7 is another name for 0


_FIELDS = (
    _FieldSpec("minute", 0, 59),
    _FieldSpec("hour", 0, 23),
    _FieldSpec("day of month", 1, 31),
    _FieldSpec("month", 1, 12),
    _FieldSpec("day of week", 0, 6, sunday_wrap=True),
)

_NUMBER = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]+)-([0-9]+)")
_WILDCARD = re.compile(r"\*(?:/([0-9]+))?")
_FIELD_CHARS = re.compile(r"[0-9*/,-]+")


class _FieldError(Exception):
    """A field's syntax error, before the caller adds where it happened."""


def _parse_field(text: str, spec: _FieldSpec) -> frozenset[int]:
    """The values a field selects; Node's syntax exactly (no steps on ranges)."""
    values: set[int] = set()

    def add(number: int) -> None:
        if spec.sunday_wrap and number == spec.high + 1:
            number = spec.low
        if number > spec.high:
            raise _FieldError(
                f"too large value '{number}': expected values in the range "
                f"{spec.low}-{spec.high}{' (or 7 for Sunday)' if spec.sunday_wrap else ''}"
            )
        if number < spec.low:
            raise _FieldError(
                f"too small value '{number}': expected values in the range {spec.low}-{spec.high}"
            )
        values.add(number)

    for part in text.split(","):
        if _NUMBER.fullmatch(part):
            add(int(part))
        elif match := _RANGE.fullmatch(part):
            first, last = int(match[1]), int(match[2])
            if last <= first:
                raise _FieldError(f"invalid range '{part}': the end must be larger than the start")
            for number in range(first, last + 1):
                add(number)
        elif match := _WILDCARD.fullmatch(part):
            step = int(match[1]) if match[1] is not None else 1
            if step < 1:
                raise _FieldError(f"invalid step in '{part}': the step must be at least 1")
            values.update(range(spec.low, spec.high + 1, step))
        else:
            raise _FieldError(
                f"unsupported syntax '{part}': expected a number, a range 'a-b', '*' or '*/n'"
            )
    return frozenset(values)


@dataclass(frozen=True)
class _Schedule:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @property
    def days_restricted(self) -> bool:
        # As Node: a field listing every value counts as "*", however it was written.
        return len(self.days) != 31

    @property
    def weekdays_restricted(self) -> bool:
        return len(self.weekdays) != 7

    def matches_wall(self, wall: datetime) -> bool:
        """Whether the wall-clock minute ``wall`` (naive or aware, as read) matches."""
        if (
            wall.minute not in self.minutes
            or wall.hour not in self.hours
            or wall.month not in self.months
        ):
            return False
        weekday = wall.isoweekday() % 7  # Sunday = 0
        if self.days_restricted and self.weekdays_restricted:
            # cron's rule: with both restricted, either one matching is enough.
            return wall.day in self.days or weekday in self.weekdays
        if self.days_restricted:
            return wall.day in self.days
        if self.weekdays_restricted:
            return weekday in self.weekdays
        return True


def _parse_schedule(fields: Sequence[str], *, line: int | None, where: str) -> _Schedule:
    parsed: list[frozenset[int]] = []
    for text, spec in zip(fields, _FIELDS, strict=True):
        try:
            if not _FIELD_CHARS.fullmatch(text):
                raise _FieldError(
                    f"unsupported syntax '{text}': expected numbers, ranges, '*' or '*/n'"
                )
            parsed.append(_parse_field(text, spec))
        except _FieldError as exc:
            raise CrontabError(
                f"{where}, {spec.name} field: {exc}", line=line, field=spec.name
            ) from None
    return _Schedule(*parsed)


# -- options -----------------------------------------------------------------------------

_TIME_PHRASE_PART = re.compile(r"([0-9]+)([smhdw])")
#: Duration units of Node's time phrases (also used by the CLI's durations).
TIME_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


def parse_time_phrase(phrase: str) -> timedelta:
    """The duration of a time phrase such as ``4w3d2h1m`` (units ``s m h d w``).

    Raises :class:`~sqla_graphile.errors.InvalidArgument` (a ``ValueError``) for anything
    else, an empty phrase included.
    """
    if not phrase:
        raise InvalidArgument("empty time phrase; expected e.g. '1h' or '4w3d2h1m'")
    total = timedelta(0)
    position = 0
    while position < len(phrase):
        match = _TIME_PHRASE_PART.match(phrase, position)
        if not match:
            raise InvalidArgument(
                f"invalid time phrase '{phrase}': did not understand '{phrase[position:]}'"
            )
        total += int(match[1]) * TIME_UNITS[match[2]]
        position = match.end()
    return total


_LINE = re.compile(r"(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)")
_COMMAND = re.compile(
    r"(?P<task>[_a-zA-Z][_a-zA-Z0-9:/_-]*)(?:\s+\?(?P<opts>\S+))?(?:\s+(?P<payload>\{.*\}))?"
)
_OPT_ID = re.compile(r"[_a-zA-Z][-_a-zA-Z0-9]*")
_OPT_QUEUE = re.compile(r"[-a-zA-Z0-9_:]+")
_OPT_INT = re.compile(r"[0-9]+")
_OPT_PRIORITY = re.compile(r"-?[0-9]+")
_OPTION_KEYS = ("id", "fill", "max", "queue", "jobKey", "jobKeyMode", "priority", "tz")


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


def _zone(value: str | ZoneInfo | None, where: str, line: int | None) -> ZoneInfo | None:
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

_UNSET: Any = object()


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
    _schedule: _Schedule

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
        set_(self, "_schedule", _parse_schedule(fields, line=line, where=label))
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
        set_(self, "timezone", _zone(timezone, label, line))
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
        minute = instant.astimezone(timezone.utc).replace(second=0, microsecond=0)
        schedule = self._schedule
        if self.timezone is None:
            return schedule.matches_wall(minute)
        wall = minute.astimezone(self.timezone)
        every_hour = len(schedule.hours) == 24
        if every_hour:
            return schedule.matches_wall(wall)
        if wall.fold == 1 and wall.replace(fold=0).utcoffset() != wall.utcoffset():
            return False  # the second pass over a repeated wall-clock hour
        if schedule.matches_wall(wall):
            return True
        # After a spring-forward gap, the wall-clock minutes that never happened fire now.
        previous = (minute - ONE_MINUTE).astimezone(self.timezone).replace(tzinfo=None)
        skipped = previous + ONE_MINUTE
        here = wall.replace(tzinfo=None)
        while skipped < here:
            if schedule.matches_wall(skipped):
                return True
            skipped += ONE_MINUTE
        return False

    def job_payload(self, ts: datetime, *, backfilled: bool = False) -> dict[str, Any]:
        """The payload of this item's job for minute ``ts``: the payload plus ``_cron``."""
        return {**self.payload, CRON_KEY: {"ts": format_timestamp(ts), "backfilled": backfilled}}


# -- JSON5 payloads --------------------------------------------------------------------


class _JSON5Error(ValueError):
    """A JSON5 syntax error, with its character position."""


_JSON5_SPACE = frozenset("\t\n\v\f\r \u00a0\u2028\u2029\ufeff")
_JSON5_ESCAPES = {
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "'": "'",
    '"': '"',
    "\\": "\\",
    "/": "/",
}
_JSON5_NUMBER = re.compile(
    r"[+-]?(?:(?P<hex>0[xX][0-9a-fA-F]+)|(?P<special>Infinity|NaN)"
    r"|(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
)


class _JSON5Reader:
    """A reader for the JSON5 values Node accepts in crontab payloads.

    Supports comments, unquoted (identifier) keys, single-quoted strings and their
    escapes, line continuations, trailing commas, hexadecimal and signed numbers, and
    leading or trailing decimal points. ``NaN`` and ``Infinity`` are refused: JSON
    cannot store them.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> _JSON5Error:
        return _JSON5Error(f"{message} at character {self.pos + 1}")

    def skip(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in _JSON5_SPACE or char.isspace():
                self.pos += 1
            elif text.startswith("//", self.pos):
                end = min(
                    (i for i in (text.find(c, self.pos) for c in "\n\r\u2028\u2029") if i >= 0),
                    default=len(text),
                )
                self.pos = end
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("unterminated comment")
                self.pos = end + 2
            else:
                return

    def document(self) -> Any:
        value = self.value()
        self.skip()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {self.text[self.pos]!r} after the value")
        return value

    def value(self) -> Any:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("unexpected end of input")
        char = self.text[self.pos]
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char in "'\"":
            return self.string()
        for word, result in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return result
        return self.number()

    def object(self) -> dict[str, Any]:
        self.pos += 1
        result: dict[str, Any] = {}
        while True:
            self.skip()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return result
            key = self.string() if self.text[self.pos : self.pos + 1] in ("'", '"') else self.name()
            self.skip()
            if not self.text.startswith(":", self.pos):
                raise self.error(f"expected ':' after the key {key!r}")
            self.pos += 1
            result[key] = self.value()
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("}", self.pos):
                raise self.error("expected ',' or '}' in an object")

    def array(self) -> list[Any]:
        self.pos += 1
        result: list[Any] = []
        while True:
            self.skip()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return result
            result.append(self.value())
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif not self.text.startswith("]", self.pos):
                raise self.error("expected ',' or ']' in an array")

    def name(self) -> str:
        start = self.pos
        chars: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.text.startswith("\\u", self.pos):
                char = self.hex_escape(self.pos + 2, 4)
                self.pos += 6
            elif (
                char in "$_"
                or char.isalpha()
                or (chars and (char.isalnum() or char in "\u200c\u200d"))
            ):
                self.pos += 1
            else:
                break
            chars.append(char)
        if not chars or not (chars[0] in "$_" or chars[0].isalpha()):
            self.pos = start
            raise self.error("expected a key (a name or a quoted string)")
        return "".join(chars)

    def hex_escape(self, at: int, length: int) -> str:
        digits = self.text[at : at + length]
        if len(digits) != length or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.error("invalid escape sequence")
        return chr(int(digits, 16))

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        chars: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated string")
            char = text[self.pos]
            if char == quote:
                self.pos += 1
                break
            if char in "\n\r":
                raise self.error("unescaped line break in a string")
            if char != "\\":
                chars.append(char)
                self.pos += 1
                continue
            escape = text[self.pos + 1 : self.pos + 2]
            if escape in _JSON5_ESCAPES:
                chars.append(_JSON5_ESCAPES[escape])
                self.pos += 2
            elif escape == "x":
                chars.append(self.hex_escape(self.pos + 2, 2))
                self.pos += 4
            elif escape == "u":
                chars.append(self.hex_escape(self.pos + 2, 4))
                self.pos += 6
            elif escape == "0" and not text[self.pos + 2 : self.pos + 3].isdigit():
                chars.append("\0")
                self.pos += 2
            elif escape in ("\n", "\u2028", "\u2029"):
                self.pos += 2  # a line continuation
            elif escape == "\r":
                self.pos += 3 if text.startswith("\r\n", self.pos + 1) else 2
            elif escape == "" or escape.isdigit():
                raise self.error("invalid escape sequence")
            else:
                chars.append(escape)
                self.pos += 2
        # Pair surrogates written as two \\u escapes, as JavaScript strings do.
        try:
            return "".join(chars).encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            raise self.error(
                "a string holds a lone surrogate, which PostgreSQL cannot store"
            ) from None

    def number(self) -> int | float:
        match = _JSON5_NUMBER.match(self.text, self.pos)
        if not match or match.end() == self.pos:
            raise self.error(f"unexpected {self.text[self.pos]!r}")
        literal = match[0]
        if match["special"]:
            raise self.error(f"{literal} cannot be stored as JSON")
        if match.end() < len(self.text) and (
            self.text[match.end()].isalnum() or self.text[match.end()] in "_$."
        ):
            raise self.error(f"invalid number {literal + self.text[match.end()]!r}")
        self.pos = match.end()
        sign = -1 if literal.startswith("-") else 1
        body = literal.lstrip("+-")
        if match["hex"]:
            return sign * int(body, 16)
        if not any(c in body for c in ".eE"):
            return sign * int(body)
        number = sign * float(body)
        if not math.isfinite(number):
            raise self.error(f"{literal} is too large for JSON")
        # JavaScript has one number type: 1.0 and 1e3 are the integers 1 and 1000.
        if number.is_integer() and abs(number) < 1e21:
            return int(number)
        return number


def _loads_json5(text: str) -> Any:
    return _JSON5Reader(text).document()


# -- parsing text ----------------------------------------------------------------------


def _parse_options(text: str | None, line: int) -> dict[str, Any]:
    if text is None:
        return {}
    where = f"line {line} of crontab"
    seen: dict[str, str] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if key not in _OPTION_KEYS:
            raise CrontabError(
                f"{where}, options: unsupported option '{key}'; supported options are "
                + ", ".join(f"'{k}'" for k in _OPTION_KEYS),
                line=line,
                field="options",
            )
        if key in seen:
            raise CrontabError(
                f"{where}, {key}: the option is given more than once", line=line, field=key
            )
        seen[key] = value
    options: dict[str, Any] = {}

    def check(key: str, pattern: re.Pattern[str] | None, what: str) -> str | None:
        if key not in seen:
            return None
        value = seen[key]
        if pattern is not None and not pattern.fullmatch(value):
            raise CrontabError(
                f"{where}, {key}: invalid value '{value}', expected {what}", line=line, field=key
            )
        return value

    if (opt := check("id", _OPT_ID, "an identifier like 'my_item-2'")) is not None:
        options["id"] = opt
    if (opt := check("fill", None, "")) is not None:
        try:
            options["fill"] = parse_time_phrase(opt)
        except ValueError as exc:
            raise CrontabError(f"{where}, fill: {exc}", line=line, field="fill") from None
    if (opt := check("max", _OPT_INT, "a positive integer")) is not None:
        options["max_attempts"] = int(opt)
        if int(opt) < 1:
            raise CrontabError(f"{where}, max: must be at least 1", line=line, field="max")
    if (opt := check("queue", _OPT_QUEUE, "letters, digits, '-', '_' or ':'")) is not None:
        options["queue"] = opt
    if (opt := check("jobKey", None, "")) is not None:
        if not opt:
            raise CrontabError(f"{where}, jobKey: the job key is empty", line=line, field="jobKey")
        options["job_key"] = opt
    mode = check(
        "jobKeyMode", re.compile("replace|preserve_run_at"), "'replace' or 'preserve_run_at'"
    )
    if mode is not None:
        options["job_key_mode"] = mode
    if (opt := check("priority", _OPT_PRIORITY, "an integer")) is not None:
        options["priority"] = int(opt)
    if (opt := check("tz", None, "")) is not None:
        options["timezone"] = _zone(opt, where, line)
    return options


def parse_crontab(text: str) -> list[Cron]:
    """The items of a crontab in Node graphile-worker's format (see the module's help).

    Blank lines and lines starting with ``#`` are ignored. Raises :class:`CrontabError`
    naming the line and the field at fault, or the duplicated identifiers.
    """
    items: list[Cron] = []
    lines_of: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number} of crontab"
        parts = _LINE.fullmatch(line)
        if not parts:
            raise CrontabError(
                f"{where}, schedule: expected five time fields, a task identifier and optional "
                f"options and payload, got {line!r}",
                line=number,
                field="schedule",
            )
        command = _COMMAND.fullmatch(parts[6])
        if not command:
            raise CrontabError(
                f"{where}, task: invalid command {parts[6]!r}; expected a task identifier "
                "([_a-zA-Z][_a-zA-Z0-9:/_-]*), then optionally ?options and a {...} payload",
                line=number,
                field="task",
            )
        options = _parse_options(command["opts"], number)
        payload: Any = None
        if command["payload"] is not None:
            try:
                payload = _loads_json5(command["payload"])
            except _JSON5Error as exc:
                raise CrontabError(
                    f"{where}, payload: invalid JSON5 object: {exc}", line=number, field="payload"
                ) from None
        items.append(
            Cron(
                " ".join(parts[i] for i in range(1, 6)),
                command["task"],
                payload=payload,
                _line=number,
                **options,
            )
        )
        identifier = items[-1].identifier
        if identifier in lines_of:
            raise CrontabError(
                f"line {number} of crontab, id: duplicate identifier '{identifier}' (first on "
                f"line {lines_of[identifier]}); give each item a unique one with '?id=...'",
                line=number,
                field="id",
            )
        lines_of[identifier] = number
    return items


def parse_crontab_file(path: str | os.PathLike[str]) -> list[Cron]:
    """The items of the crontab file at ``path`` (UTF-8)."""
    return parse_crontab(Path(path).read_text(encoding="utf-8"))


def _check_unique(items: Sequence[Cron]) -> None:
    seen: set[str] = set()
    duplicates: list[str] = []
    for item in items:
        if item.identifier in seen and item.identifier not in duplicates:
            duplicates.append(item.identifier)
        seen.add(item.identifier)
    if duplicates:
        raise CrontabError(
            "duplicate cron identifiers: "
            + ", ".join(f"'{d}'" for d in duplicates)
            + "; give each item a unique one with '?id=...' (or Cron(..., id=...))",
            field="id",
        )


CrontabSource = Union[str, "os.PathLike[str]", Iterable[Cron], None]
"""What :func:`load_crontab` accepts: crontab text, a file path, or :class:`Cron` items."""


def load_crontab(value: CrontabSource) -> list[Cron]:
    """Normalise a crontab given as text (``str``), a file (a ``Path``) or ``Cron`` items.

    ``None`` gives no items. Identifiers must be unique.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return parse_crontab(value)
    if isinstance(value, os.PathLike):
        return parse_crontab_file(value)
    items = list(value)
    for item in items:
        if not isinstance(item, Cron):
            raise InvalidArgumentType(f"a crontab list holds Cron items, not {type(item).__name__}")
    _check_unique(items)
    return items


# -- the scheduler ---------------------------------------------------------------------


@dataclass(frozen=True)
class CronTickEvent:
    """``cron_tick``: the scheduler handled minute ``timestamp``.

    Emitted for every minute of the live loop (``backfilled=False``), and for every
    backfilled minute that had due items. ``due`` lists the identifiers matching the
    minute; ``scheduled`` those for which this process added a job (the others were
    already handled by another process, or are in ``failed``); ``failed`` those whose
    job the database refused (each logged; the other items were scheduled all the same).
    """

    timestamp: datetime
    backfilled: bool
    due: tuple[str, ...]
    scheduled: tuple[str, ...]
    failed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CronJobScheduledEvent:
    """``cron_job_scheduled``: this process added item ``cron``'s job for ``timestamp``."""

    cron: Cron
    timestamp: datetime
    backfilled: bool
    job_id: int | None
    """The job's id (``None`` if ``add_job`` wrote nothing because a worker held the job
    of the same key at that moment)."""


_RETRY_MIN = 0.2
_RETRY_MAX = 60.0
_RETRY_FACTOR = 1.5

ConnectionFactory = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[Any]]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _floor_minute(instant: datetime) -> datetime:
    return instant.replace(second=0, microsecond=0)


def _ceil_minute(instant: datetime) -> datetime:
    floor = _floor_minute(instant)
    return floor if floor == instant else floor + ONE_MINUTE


@dataclass
class _Statements:
    read_known: Executable
    register_unknown: Executable
    schedule: Executable


_TIMESTAMPTZ = DateTime(timezone=True)


@functools.lru_cache(maxsize=64)
def _statements(schema: str) -> _Statements:
    """The cron statements of the worker schema called ``schema`` (built once)."""
    tables = worker_schema(schema)
    fn = worker_functions(schema)
    known = tables.private_known_crontabs
    ts = bindparam("ts", type_=_TIMESTAMPTZ)

    read_known = select(known.c.identifier, known.c.known_since, known.c.last_execution)
    register_unknown = (
        pg_insert(known)
        .from_select(
            ["identifier", "known_since"],
            select(
                func.unnest(bindparam("identifiers", type_=postgresql.ARRAY(Text))),
                bindparam("known_since", type_=_TIMESTAMPTZ),
            ),
        )
        .on_conflict_do_nothing(index_elements=[known.c.identifier])
    )

    # The minute's items, in order: one JSON array in, one row per item.
    entries = (
        func.json_to_recordset(cast(bindparam("specs", type_=Text), postgresql.JSON))
        .table_valued(
            column("ordinal", Integer),
            column("identifier", Text),
            column("task", Text),
            column("payload", postgresql.JSON),
            column("queue_name", Text),
            column("max_attempts", Integer),
            column("job_key", Text),
            column("priority", Integer),
            column("job_key_mode", Text),
        )
        .render_derived(name="entries", with_types=True)
    )
    specs = select(*entries.c).cte("specs")
    upsert = pg_insert(known).from_select(
        ["identifier", "known_since", "last_execution"], select(specs.c.identifier, ts, ts)
    )
    # Claim the minute: a row is written only where this minute was not handled yet; a
    # concurrent process waits on the row, then finds last_execution = ts and skips.
    claimed = (
        upsert.on_conflict_do_update(
            index_elements=[known.c.identifier],
            set_={"last_execution": upsert.excluded.last_execution},
            where=or_(
                known.c.last_execution.is_(None),
                known.c.last_execution < upsert.excluded.last_execution,
            ),
        )
        .returning(known.c.identifier)
        .cte("claimed")
    )
    job_id = fn.add_job(
        specs.c.task,
        specs.c.payload,
        queue_name=specs.c.queue_name,
        run_at=ts,
        max_attempts=specs.c.max_attempts,
        job_key=specs.c.job_key,
        priority=specs.c.priority,
        flags=None,
        job_key_mode=specs.c.job_key_mode,
    ).scalar_table_valued("id", BigInteger)
    # add_job is volatile, so PostgreSQL calls it after the sort: in item order.
    schedule = (
        select(specs.c.identifier, job_id.label("job_id"))
        .select_from(specs.join(claimed, claimed.c.identifier == specs.c.identifier))
        .order_by(specs.c.ordinal)
    )
    return _Statements(read_known, register_unknown, schedule)


def _transient(exc: BaseException) -> bool:
    # Imported here: the worker package imports this module.
    from .worker.connection import is_transient

    return is_transient(exc)


def _describe(exc: BaseException) -> str:
    error = getattr(exc, "orig", None) or exc
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class CronScheduler:
    """Schedules cron items' jobs, as Node graphile-worker's cron does, until stopped.

    ``bind`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, a database URL, or a
    callable returning an async context manager that yields an
    :class:`~sqlalchemy.ext.asyncio.AsyncConnection` (its transactions are managed
    here). ``crontab`` is anything :func:`load_crontab` accepts. ``clock`` returns the
    current time as an aware datetime and ``sleep`` waits a number of seconds; both
    default to the real ones and are there for tests and simulations.

    At start, identifiers never seen in ``_private_known_crontabs`` are recorded (and not
    backfilled); the minutes missed within each item's ``fill`` are scheduled, flagged
    ``backfilled``; then each minute boundary schedules the items matching that minute,
    catching up minute by minute after a pause or a clock jump. Errors restart the whole
    cycle (backfill included) after an exponential backoff of 0.2 s to 60 s.

    Jobs are added by the SQL ``add_job`` in the statement that claims the minute, as
    Node does, so ``before_job_schedule`` interceptors do not see them; the ``cron_tick``
    and ``cron_job_scheduled`` events are emitted through ``hooks``. If the database
    refuses one item's job, the minute's other items are still scheduled: the failure is
    logged, that item's minute stays unclaimed, and the scheduler carries on. A lost
    connection (or another error a retry may cure) restarts the cycle instead.
    """

    def __init__(
        self,
        bind: AsyncEngine | str | ConnectionFactory,
        crontab: CrontabSource,
        *,
        schema: str = DEFAULT_SCHEMA,
        hooks: Hooks | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.schema = validate_schema_name(schema)
        self.items: list[Cron] = load_crontab(crontab)
        self.hooks = hooks
        self.clock: Clock = clock or _utc_now
        self.sleep: Sleep = sleep or asyncio.sleep
        self._bind = bind
        self._owned_engine: AsyncEngine | None = None
        self._attempts = 0
        self._sql = _statements(self.schema)

    # -- database -------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        bind = self._bind
        if isinstance(bind, str):
            if self._owned_engine is None:
                # One connection per transaction: the scheduler speaks once a minute, and an
                # idle pooled link could die in between.
                self._owned_engine = async_engine_from_url(bind, poolclass=NullPool)
            bind = self._owned_engine
        if isinstance(bind, AsyncEngine):
            async with bind.begin() as connection:
                yield connection
            return
        async with bind() as connection, connection.begin():
            yield connection

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise InvalidArgument("the cron clock must return aware datetimes")
        return now.astimezone(timezone.utc)

    async def schedule_minute(
        self, ts: datetime, items: Sequence[Cron] | None = None, *, backfilled: bool = False
    ) -> list[str]:
        """Schedule minute ``ts`` for ``items`` (default: those matching it), in one statement.

        Returns the identifiers this call scheduled: those whose minute no other process
        (Python or Node) had handled yet. An item whose job the database refuses is
        logged and reported in the ``cron_tick`` event; the others are scheduled.
        """
        ts = _floor_minute(ts.astimezone(timezone.utc))
        due = [item for item in self.items if item.matches(ts)] if items is None else list(items)
        if not due:
            await self._emit("cron_tick", CronTickEvent(ts, backfilled, (), ()))
            return []
        specs = [
            {
                "ordinal": ordinal,
                "identifier": item.identifier,
                "task": item.task,
                "payload": item.job_payload(ts, backfilled=backfilled),
                "queue_name": item.queue,
                "max_attempts": item.max_attempts,
                "job_key": item.job_key,
                "priority": item.priority,
                "job_key_mode": item.job_key_mode,
            }
            for ordinal, item in enumerate(due)
        ]
        failed: list[str] = []

        def refused(spec: dict[str, Any], exc: Exception) -> None:
            failed.append(spec["identifier"])
            logger.error(
                "cron could not add the job of item %r (task %r) for %s; the minute's other "
                "items are scheduled regardless: %s",
                spec["identifier"],
                spec["task"],
                format_timestamp(ts),
                _describe(exc),
                exc_info=None if isinstance(exc, DBAPIError) else exc,
            )

        try:
            rows = await self._add_jobs(specs, ts)
        except Exception as exc:
            if _transient(exc):
                raise  # a lost connection, say: the cycle restarts, and backfills
            rows = []
            if len(specs) == 1:
                refused(specs[0], exc)
            else:
                # The statement is all or nothing: one refused job would cost every item
                # its minute, every minute. Add each item's job on its own instead.
                for spec in specs:
                    try:
                        rows.extend(await self._add_jobs([spec], ts))
                    except Exception as item_exc:
                        if _transient(item_exc):
                            raise
                        refused(spec, item_exc)
        by_id = {item.identifier: item for item in due}
        scheduled = [row.identifier for row in rows]
        if scheduled:
            logger.debug("cron scheduled %s for %s", ", ".join(scheduled), format_timestamp(ts))
        await self._emit(
            "cron_tick",
            CronTickEvent(
                ts,
                backfilled,
                tuple(i.identifier for i in due),
                tuple(scheduled),
                tuple(failed),
            ),
        )
        if self.hooks is not None and self.hooks.has("cron_job_scheduled"):
            for row in rows:
                await self.hooks.emit(
                    "cron_job_scheduled",
                    CronJobScheduledEvent(by_id[row.identifier], ts, backfilled, row.job_id),
                )
        return scheduled

    async def _add_jobs(self, specs: list[dict[str, Any]], ts: datetime) -> list[Any]:
        """Claim minute ``ts`` for ``specs`` and add their jobs, in one transaction."""
        async with self._transaction() as connection:
            result = await connection.execute(
                self._sql.schedule, {"specs": encode_json_value(specs), "ts": ts}
            )
            return list(result.all())

    async def _emit(self, event: str, payload: Any) -> None:
        if self.hooks is not None and self.hooks.has(event):
            await self.hooks.emit(event, payload)

    async def register_and_backfill(self, start: datetime) -> None:
        """Record unknown identifiers as known since ``start``; backfill the known ones."""
        start = start.astimezone(timezone.utc)
        async with self._transaction() as connection:
            rows = (await connection.execute(self._sql.read_known)).all()
        known = {row.identifier: row for row in rows}
        unknown = [item.identifier for item in self.items if item.identifier not in known]
        if unknown:
            async with self._transaction() as connection:
                await connection.execute(
                    self._sql.register_unknown, {"identifiers": unknown, "known_since": start}
                )
        largest = max((item.fill for item in self.items), default=timedelta(0))
        if largest <= timedelta(0):
            return
        candidates = [
            (item, known[item.identifier].last_execution or known[item.identifier].known_since)
            for item in self.items
            if item.identifier in known and item.fill > timedelta(0)
        ]
        ts = _ceil_minute(start - largest)
        # One minute at a time, in order: last_execution must only ever move forward.
        while ts < start:
            age = start - ts
            due = [
                item
                for item, not_before in candidates
                if item.fill >= age and ts >= not_before and item.matches(ts)
            ]
            if due:
                await self.schedule_minute(ts, due, backfilled=True)
            ts += ONE_MINUTE

    # -- the loop -------------------------------------------------------------------

    async def _wait(self, seconds: float, stop: asyncio.Event) -> bool:
        """Sleep ``seconds`` unless ``stop`` is set first; return whether it is set."""
        if stop.is_set():
            return True
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                if not task.done():
                    task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)
        if sleeper.done() and not sleeper.cancelled() and sleeper.exception() is not None:
            raise sleeper.exception()  # type: ignore[misc]
        return stop.is_set()

    async def _cycle(self, stop: asyncio.Event) -> None:
        start = self._now()
        await self.register_and_backfill(start)
        next_ts = _ceil_minute(start)
        while not stop.is_set():
            delay = (next_ts - self._now()).total_seconds() + 0.001
            if delay > 0 and await self._wait(delay, stop):
                return
            if stop.is_set():
                return
            self._attempts = 0  # healthy
            if _floor_minute(self._now()) < next_ts:
                continue  # woke up early (clock skew): wait again
            # Late (a pause, a clock jump forward): each missed minute in turn, live.
            await self.schedule_minute(next_ts)
            next_ts += ONE_MINUTE

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule jobs until ``stop`` is set; errors restart after a backoff."""
        try:
            while not stop.is_set():
                try:
                    await self._cycle(stop)
                    return
                except Exception as exc:
                    self._attempts += 1
                    # Node's schedule, with jitter against a thundering herd.
                    base = _RETRY_MIN * _RETRY_FACTOR ** min(self._attempts - 1, 64)
                    delay = min(base * (0.5 + random.random()), _RETRY_MAX)
                    logger.error(
                        "cron hit an error; restarting in %.0f ms (attempt %d): %s",
                        delay * 1000,
                        self._attempts,
                        exc,
                        exc_info=exc,
                    )
                    if await self._wait(delay, stop):
                        return
        finally:
            if self._owned_engine is not None:
                await self._owned_engine.dispose()
                self._owned_engine = None
