"""The five time fields of a cron item, and whether a minute matches them.

The syntax is Node graphile-worker's exactly: each field is a comma list of numbers,
``a-b`` ranges, ``*`` and ``*/n`` (steps apply to ``*`` only); day of week 7 is another
name for Sunday (0). Names (``JAN``, ``MON``) and steps on ranges are refused, as Node
refuses them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from ..errors import CrontabError

ONE_MINUTE = timedelta(minutes=1)


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
class Schedule:
    """The values each of the five fields selects."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    @property
    def days_restricted(self) -> bool:
        """Whether the day-of-month field leaves out a day.

        As in Node, a field listing every value counts as ``*``, however it was written.
        """
        return len(self.days) != 31

    @property
    def weekdays_restricted(self) -> bool:
        """Whether the day-of-week field leaves out a day (as :attr:`days_restricted`)."""
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

    def matches(self, minute: datetime, zone: ZoneInfo | None) -> bool:
        """Whether the UTC minute ``minute`` matches, the fields read on ``zone``'s clock.

        Without a zone the fields are read in UTC, as Node does. With one, daylight-saving
        changes are handled as cron daemons do for items whose hour field is restricted:
        a time skipped by a spring-forward change fires at the first minute after the
        gap, and a time repeated by a fall-back change fires only on its first pass.
        Items running every hour simply follow the wall clock through the change.
        """
        if zone is None:
            return self.matches_wall(minute)
        wall = minute.astimezone(zone)
        if len(self.hours) == 24:
            return self.matches_wall(wall)
        if wall.fold == 1 and wall.replace(fold=0).utcoffset() != wall.utcoffset():
            return False  # the second pass over a repeated wall-clock hour
        if self.matches_wall(wall):
            return True
        # After a spring-forward gap, the wall-clock minutes that never happened fire now.
        previous = (minute - ONE_MINUTE).astimezone(zone).replace(tzinfo=None)
        skipped = previous + ONE_MINUTE
        here = wall.replace(tzinfo=None)
        while skipped < here:
            if self.matches_wall(skipped):
                return True
            skipped += ONE_MINUTE
        return False


def parse_schedule(fields: Sequence[str], *, line: int | None, where: str) -> Schedule:
    """The schedule of the five ``fields``; a :class:`CrontabError` names the field at fault."""
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
    return Schedule(*parsed)


def floor_minute(instant: datetime) -> datetime:
    """``instant`` without its seconds."""
    return instant.replace(second=0, microsecond=0)


def ceil_minute(instant: datetime) -> datetime:
    """The first minute boundary at or after ``instant``."""
    floor = floor_minute(instant)
    return floor if floor == instant else floor + ONE_MINUTE


def utc_minute(instant: datetime) -> datetime:
    """The minute holding the aware ``instant``, in UTC."""
    return floor_minute(instant.astimezone(timezone.utc))
