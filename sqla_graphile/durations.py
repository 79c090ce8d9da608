"""Durations: one grammar for crontab time phrases and the command line's options.

A duration is a run of ``<amount><unit>`` parts, summed: ``1h30m``, ``4w3d2h1m``, ``1d1d``
(two days). Two dialects read it:

- :func:`parse_time_phrase` reads Node graphile-worker's time phrases (a crontab's
  ``fill``): whole amounts, units ``s m h d w``, nothing else, so that a crontab this
  library accepts is one Node accepts too.
- :func:`parse_duration` reads the command line's durations, a superset: amounts may
  have a fraction (``1.5h``), ``ms`` is a unit too (``250ms``), a bare number is seconds
  (``90``), and blanks around the text are ignored.

Both raise :class:`~sqla_graphile.errors.InvalidArgument` (a ``ValueError``) for text
they do not read, or a duration too long for a :class:`~datetime.timedelta`.
"""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import InvalidArgument

__all__ = ["TIME_UNITS", "parse_duration", "parse_time_phrase"]

#: The units of Node's time phrases.
TIME_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_UNITS = {"ms": timedelta(milliseconds=1), **TIME_UNITS}

# One part of each dialect; the command line's adds fractions and milliseconds.
_NODE_PART = re.compile(r"([0-9]+)([smhdw])")
_CLI_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[smhdw])")
_CLI_SECONDS = re.compile(r"\d+(?:\.\d+)?")


class _Unread(Exception):
    """The text is not a duration from character ``position`` on."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


def _sum(text: str, part: re.Pattern[str]) -> timedelta:
    """The sum of the parts making up all of ``text``.

    Raises :class:`_Unread` where no part starts, ``OverflowError`` past ``timedelta.max``.
    """
    total = timedelta(0)
    position = 0
    while position < len(text):
        match = part.match(text, position)
        if not match:
            raise _Unread(position)
        amount = match[1]
        # Whole amounts are multiplied exactly; fractions are rounded to the microsecond.
        total += (float(amount) if "." in amount else int(amount)) * _UNITS[match[2]]
        position = match.end()
    return total


def parse_time_phrase(phrase: str) -> timedelta:
    """The duration of a time phrase such as ``4w3d2h1m`` (units ``s m h d w``).

    Raises :class:`~sqla_graphile.errors.InvalidArgument` (a ``ValueError``) for anything
    else, an empty phrase included.
    """
    if not phrase:
        raise InvalidArgument("empty time phrase; expected e.g. '1h' or '4w3d2h1m'")
    try:
        return _sum(phrase, _NODE_PART)
    except _Unread as unread:
        raise InvalidArgument(
            f"invalid time phrase '{phrase}': did not understand '{phrase[unread.position :]}'"
        ) from None
    except OverflowError:
        raise InvalidArgument(f"the time phrase '{phrase}' is too long a duration") from None


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``5m``, ``1h30m``, ``1.5h``, ``250ms`` or plain seconds (``90``).

    A superset of :func:`parse_time_phrase`. Raises
    :class:`~sqla_graphile.errors.InvalidArgument` (a ``ValueError``) for anything else.
    """
    value = text.strip()
    try:
        if _CLI_SECONDS.fullmatch(value):
            return timedelta(seconds=float(value))
        if value:
            return _sum(value, _CLI_PART)
    except _Unread:
        pass
    except OverflowError:
        raise InvalidArgument(f"{text!r} is too long a duration") from None
    raise InvalidArgument(f"{text!r} is not a duration (examples: 30s, 5m, 1h30m)")
