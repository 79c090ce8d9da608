"""Crontab payloads: JSON5 read by the json5 package, with Node's meaning, without a database.

The vectors and the reasons for the few that read differently than before are in
json5_vectors.py; tests/interop/test_interop_cron.py checks them against Node's json5.
"""

from __future__ import annotations

from typing import Any

import pytest
from json5_vectors import (
    CHANGED,
    CHANGED_READER_ONLY,
    PAYLOADS,
    READER_ONLY,
    Refused,
)

from sqla_graphile.cron import CrontabError, parse_crontab
from sqla_graphile.cron.crontab import loads_json5


def same(actual: Any, expected: Any) -> bool:
    """Equal, and of the same types throughout (``1`` is not ``1.0``), keys in order."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, dict):
        return list(actual) == list(expected) and all(
            same(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same, actual, expected))
    return bool(actual == expected)


def read_line(payload: str) -> Any:
    """The payload of a crontab's second line holding ``payload``."""
    first, second = parse_crontab(f"* * * * * fine\n* * * * * t {payload}\n")
    assert first.payload == {}
    return second.payload


@pytest.mark.parametrize(("payload", "expected"), PAYLOADS + CHANGED)
def test_payload_vectors(payload: str, expected: Any) -> None:
    if isinstance(expected, Refused):
        with pytest.raises(CrontabError) as caught:
            read_line(payload)
        error = caught.value
        assert (error.line, error.field) == (2, expected.field)
        assert str(error).startswith(f"line 2 of crontab, {expected.field}: ")
        assert expected.says in str(error)
    else:
        assert same(read_line(payload), expected), read_line(payload)


@pytest.mark.parametrize(("payload", "expected"), READER_ONLY + CHANGED_READER_ONLY)
def test_reader_only_vectors(payload: str, expected: Any) -> None:
    assert len(f"* * * * * t {payload}".splitlines()) > 1  # not one crontab line
    if isinstance(expected, Refused):
        with pytest.raises(ValueError):
            loads_json5(payload)
    else:
        assert same(loads_json5(payload), expected)


def test_numbers_keep_javascript_meaning_where_json_can_hold_it() -> None:
    values = read_line(
        "{whole: 2.0, exp: 1e3, big: 1e21, frac: 0.5, hex: -0xff, huge: 123456789012345678901}"
    )
    assert same(
        values,
        {
            "whole": 2,
            "exp": 1000,
            "big": 1e21,
            "frac": 0.5,
            "hex": -255,
            "huge": 123456789012345678901,
        },
    )
    for literal in ("NaN", "-Infinity", "+Infinity", "1e999"):
        with pytest.raises(CrontabError, match=r"line 2 of crontab, payload: .*JSON") as caught:
            read_line(f"{{a: [1, {literal}]}}")
        assert caught.value.field == "payload"


def test_nul_and_lone_surrogates_are_refused_naming_the_line() -> None:
    for payload, says in (
        ("{a: 'x\\u0000y'}", "NUL"),
        ("{'k\\0': 1}", "NUL"),
        ("{a: ['\\udc00']}", "lone surrogate"),
        ("{'\\ud800': 1}", "lone surrogate"),
        ("{a: {b: 'x\\ud83d'}}", "lone surrogate"),
    ):
        with pytest.raises(CrontabError) as caught:
            read_line(payload)
        assert (caught.value.line, caught.value.field) == (2, "payload"), payload
        assert says in str(caught.value), payload
    # A pair written as two escapes is one character, in keys as in values.
    assert read_line("{'\\ud83d\\ude00': ['\\ud83d\\ude00']}") == {"\U0001f600": ["\U0001f600"]}


def test_deep_nesting_is_a_crontab_error() -> None:
    assert read_line("{a: " + "[" * 20 + "]" * 20 + "}") == {
        "a": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]
    }
    with pytest.raises(CrontabError, match="nested too deeply") as caught:
        read_line("{a: " + "[" * 2000 + "]" * 2000 + "}")
    assert (caught.value.line, caught.value.field) == (2, "payload")


def test_errors_say_where_in_the_payload() -> None:
    with pytest.raises(CrontabError) as caught:
        read_line("{a: 1 b: 2}")
    assert str(caught.value) == (
        'line 2 of crontab, payload: invalid JSON5 object: Unexpected "b" at column 7'
    )
    with pytest.raises(CrontabError, match="invalid number '1e'"):
        read_line("{a: 1e}")
