"""Option values of the command line: durations, times, names, job ids."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import click

from ..durations import parse_duration as _parse_duration

__all__ = [
    "DURATION",
    "JOB_ID",
    "NAME",
    "POSITIVE_DURATION",
    "TIME",
    "parse_duration",
    "parse_time",
]


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``5m``, ``1h30m``, ``250ms`` or plain seconds (``90``).

    The grammar of :func:`sqla_graphile.durations.parse_duration`, crontab time phrases'
    superset.
    """
    return _parse_duration(text)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time (``2026-01-02T03:04:05Z``) or ``now``; always tz-aware."""
    value = text.strip()
    if value.lower() == "now":
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2026-01-02T03:04:05Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone offset (add Z or +00:00)")
    return parsed


class _Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            duration = value
        else:
            try:
                duration = parse_duration(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if self.positive and duration <= timedelta(0):
            self.fail(f"{value!r} must be longer than 0", param, ctx)
        return duration


class _Time(click.ParamType):  # type: ignore[type-arg]
    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Name(click.ParamType):  # type: ignore[type-arg]
    """A task identifier, queue name, job key, flag or worker id: text, never empty."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail("must not be empty", param, ctx)
        return value


DURATION = _Duration()
#: Job ids are PostgreSQL bigints, from 1.
JOB_ID = click.IntRange(1, 2**63 - 1)
POSITIVE_DURATION = _Duration(positive=True)
TIME = _Time()
NAME = _Name()
