"""Durations: one grammar, read as Node's time phrases (crontab) and as the CLI's options."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from sqla_graphile import cli, cron
from sqla_graphile.durations import TIME_UNITS, parse_duration, parse_time_phrase
from sqla_graphile.errors import InvalidArgument

BOTH = [
    ("30s", timedelta(seconds=30)),
    ("5m", timedelta(minutes=5)),
    ("2h", timedelta(hours=2)),
    ("1d", timedelta(days=1)),
    ("3w", timedelta(weeks=3)),
    ("1h30m", timedelta(minutes=90)),
    ("4w3d2h1m", timedelta(weeks=4, days=3, hours=2, minutes=1)),
    ("1d1d", timedelta(days=2)),
    ("0s", timedelta(0)),
    ("90m30s", timedelta(minutes=90, seconds=30)),
]


@pytest.mark.parametrize(("text", "expected"), BOTH)
def test_both_dialects_read_time_phrases(text: str, expected: timedelta) -> None:
    assert parse_time_phrase(text) == expected
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("1s500ms", timedelta(seconds=1, milliseconds=500)),
        ("1.5h", timedelta(minutes=90)),
        ("0.25s", timedelta(milliseconds=250)),
        ("90", timedelta(seconds=90)),
        ("2.5", timedelta(seconds=2.5)),
        ("  5m\n", timedelta(minutes=5)),
    ],
)
def test_the_cli_dialect_adds_ms_fractions_bare_seconds_and_blanks(
    text: str, expected: timedelta
) -> None:
    assert parse_duration(text) == expected
    # Node's time phrases have none of these: a crontab this reads, Node reads too.
    with pytest.raises(InvalidArgument, match="invalid time phrase"):
        parse_time_phrase(text)


@pytest.mark.parametrize(
    ("phrase", "rest"),
    [("h", "h"), ("1", "1"), ("1h ", " "), ("1H", "1H"), ("-1h", "-1h"), ("5ms", "s")],
)
def test_time_phrase_errors_say_what_was_not_understood(phrase: str, rest: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_time_phrase(phrase)
    assert str(caught.value) == f"invalid time phrase '{phrase}': did not understand '{rest}'"
    with pytest.raises(InvalidArgument, match="empty time phrase"):
        parse_time_phrase("")


@pytest.mark.parametrize("text", ["", "  ", "5x", "m5", "-5s", "1h 30m", "five", "1.2.3s", ".5s"])
def test_cli_duration_errors(text: str) -> None:
    with pytest.raises(InvalidArgument, match="^" + re.escape(f"{text!r} is not a duration")):
        parse_duration(text)


def test_durations_past_timedelta_max_are_refused_not_overflowed() -> None:
    with pytest.raises(InvalidArgument, match="too long a duration"):
        parse_time_phrase("99999999999999999999w")
    with pytest.raises(InvalidArgument, match="too long a duration"):
        parse_duration("9" * 400)
    with pytest.raises(InvalidArgument, match="too long a duration"):
        parse_duration("9" * 400 + ".5h")


def test_cron_and_cli_use_this_grammar() -> None:
    assert cli.parse_duration("1h30m") == timedelta(minutes=90)
    assert cli.parse_duration("250ms") == timedelta(milliseconds=250)
    assert cron.parse_time_phrase is parse_time_phrase
    assert cron.TIME_UNITS is TIME_UNITS
    assert cron.Cron("* * * * *", "t", fill="1d12h").fill == timedelta(hours=36)
    with pytest.raises(cron.CrontabError, match=r"fill: the time phrase .* is too long"):
        cron.Cron("* * * * *", "t", fill="99999999999999999999w")
