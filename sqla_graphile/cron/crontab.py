"""Crontab text: its lines, their options and JSON5 payloads; and :func:`load_crontab`."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union
from urllib.parse import parse_qsl

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
