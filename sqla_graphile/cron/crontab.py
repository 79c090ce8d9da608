"""Crontab text: its lines, their options and JSON5 payloads; and :func:`load_crontab`."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union
from urllib.parse import parse_qsl

import json5

from ..durations import parse_time_phrase
from ..errors import CrontabError, InvalidArgumentType
from .item import Cron, parse_zone

_LINE = re.compile(r"(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(.*)")
_COMMAND = re.compile(
    r"(?P<task>[_a-zA-Z][_a-zA-Z0-9:/_-]*)(?:\s+\?(?P<opts>\S+))?(?:\s+(?P<payload>\{.*\}))?"
)
_OPT_ID = re.compile(r"[_a-zA-Z][-_a-zA-Z0-9]*")
_OPT_QUEUE = re.compile(r"[-a-zA-Z0-9_:]+")
_OPT_INT = re.compile(r"[0-9]+")
_OPT_PRIORITY = re.compile(r"-?[0-9]+")
_OPTION_KEYS = ("id", "fill", "max", "queue", "jobKey", "jobKeyMode", "priority", "tz")


# -- JSON5 payloads --------------------------------------------------------------------
#
# The json5 package reads the syntax (as Node's json5 does: comments, unquoted keys,
# single quotes, trailing commas, hexadecimal numbers ...); these hooks give its values
# the meaning Node gives them, as far as JSON can hold them, and refuse the rest.


class _JSON5Error(ValueError):
    """A payload that is not a JSON5 object JSON can hold; the message says why."""


def _number(literal: str, base: int = 10) -> int | float:
    """The value of a JSON5 number, given its text (json5 calls this for every number).

    Integers, hexadecimal ones included, stay exact even beyond 2**53 (PostgreSQL stores
    them; a JavaScript double would round them). Other numbers are doubles, and a whole
    one below 1e21 is an integer, since JavaScript has one number type (``1.0`` and
    ``1e3`` are ``1`` and ``1000``, as Node writes them). ``NaN``, ``Infinity`` and numbers
    too large for a double are refused: JSON cannot hold them. ``base`` is ignored: the
    literal says whether it is hexadecimal.
    """
    sign = -1 if literal.startswith("-") else 1
    body = literal.lstrip("+-")
    if body in ("Infinity", "NaN"):
        raise _JSON5Error(f"{literal} cannot be stored as JSON")
    try:
        if body[:2] in ("0x", "0X"):
            return sign * int(body, 16)
        if not any(c in body for c in ".eE"):
            return sign * int(body)
        number = sign * float(body)
    except ValueError:  # json5 lets an exponent without digits through ("1e")
        raise _JSON5Error(f"invalid number '{literal}'") from None
    if not math.isfinite(number):
        raise _JSON5Error(f"{literal} is too large for JSON")
    if number.is_integer() and abs(number) < 1e21:
        return int(number)
    return number


def _text(value: str) -> str:
    """``value`` with surrogate pairs joined into characters, as in JavaScript strings.

    A lone surrogate is refused: PostgreSQL cannot store it.
    """
    try:
        return value.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise _JSON5Error(
            "a string holds a lone surrogate, which PostgreSQL cannot store"
        ) from None


def _strings(value: Any) -> Any:
    """``value`` with :func:`_text` applied to every string in it, keys included."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_strings(item) for item in value]
    if isinstance(value, dict):
        return {_text(key): _strings(item) for key, item in value.items()}
    return value


# json5's messages start with the document's name and line; a payload has one line.
_JSON5_WHERE = re.compile(r"^<string>:\d+ ")


def loads_json5(text: str) -> Any:
    """The value of the JSON5 document ``text``, read as Node reads it.

    Raises :class:`_JSON5Error` (a ``ValueError``) saying what is wrong with it.
    """
    try:
        value = json5.loads(text, parse_int=_number, parse_float=_number, parse_constant=_number)
    except ValueError as exc:  # the hooks' refusals included
        raise _JSON5Error(_JSON5_WHERE.sub("", str(exc))) from None
    except RecursionError:
        # json5 reads nested values recursively, a few dozen levels deep at most.
        raise _JSON5Error("the value is nested too deeply") from None
    return _strings(value)


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
        options["timezone"] = parse_zone(opt, where, line)
    return options


def parse_crontab(text: str) -> list[Cron]:
    """The items of a crontab in Node graphile-worker's format (see :mod:`sqla_graphile.cron`).

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
                payload = loads_json5(command["payload"])
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
