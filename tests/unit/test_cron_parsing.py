"""Cron: Node graphile-worker's crontab format, matching, and the scheduler.

Every scheduler test runs against a real PostgreSQL; only time is simulated, through the
scheduler's injectable clock and sleep.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sqla_graphile.cron import (
    Cron,
    CrontabError,
    format_timestamp,
    load_crontab,
    parse_crontab,
    parse_crontab_file,
    parse_time_phrase,
)

UTC = timezone.utc


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


# -- parsing ---------------------------------------------------------------------------


def test_parse_full_line() -> None:
    (item,) = parse_crontab(
        "0 4 * * 1 send_digest ?id=digest&fill=4w3d2h1m&max=10&queue=mail:low"
        "&jobKey=digest-key&jobKeyMode=preserve_run_at&priority=-5 "
        '{"onboarding": false, "n": [1, 2.5, "x"]}'
    )
    assert item.schedule == "0 4 * * 1"
    assert item.task == "send_digest"
    assert item.identifier == "digest"
    assert item.fill == timedelta(weeks=4, days=3, hours=2, minutes=1)
    assert item.fill == timedelta(minutes=44761)
    assert item.max_attempts == 10
    assert item.queue == "mail:low"
    assert item.job_key == "digest-key"
    assert item.job_key_mode == "preserve_run_at"
    assert item.priority == -5
    assert item.payload == {"onboarding": False, "n": [1, 2.5, "x"]}
    assert item.timezone is None


def test_parse_defaults_comments_blank_lines_and_crlf() -> None:
    items = parse_crontab(
        "# a comment\r\n\r\n   \r\n  */5 * * * * task:with/odd-chars_1  \r\n"
        "   # indented comment\n* * * * * other ?jobKey=k\n"
    )
    assert [i.identifier for i in items] == ["task:with/odd-chars_1", "other"]
    first, second = items
    assert first.fill == timedelta(0)
    assert (first.max_attempts, first.queue, first.job_key, first.priority) == (None,) * 4
    assert first.job_key_mode is None
    assert first.payload == {}
    # jobKeyMode defaults to "replace" when a key is given, as in Node.
    assert second.job_key_mode == "replace"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ('{"a": 1, "b": {"c": [true, null]}}', {"a": 1, "b": {"c": [True, None]}}),
        ("{a: 1, 'b': 'it\\'s', $c_1: \"\\u00e9\\x41\\n\"}", {"a": 1, "b": "it's", "$c_1": "éA\n"}),
        ("{a: [1, 2,], b: {c: 3,},}", {"a": [1, 2], "b": {"c": 3}}),
        ("{/* block */ a: 1, // to the end of the line is not possible on one line\n}", {"a": 1}),
        (
            "{h: 0x1F, n: -.5, p: +3, t: 5., e: 1e3}",
            {"h": 31, "n": -0.5, "p": 3, "t": 5, "e": 1000},
        ),
    ],
)
def test_parse_payload_json_and_json5(payload: str, expected: dict[str, Any]) -> None:
    if "\n" in payload:  # a crontab line cannot hold a line break; check the reader alone
        from sqla_graphile.cron.crontab import loads_json5

        assert loads_json5(payload) == expected
        return
    (item,) = parse_crontab(f"* * * * * t {payload}")
    assert item.payload == expected


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("60 * * * * t", "minute", "too large value '60'"),
        ("* 24 * * * t", "hour", "too large value '24'"),
        ("* * 0 * * t", "day of month", "too small value '0'"),
        ("* * 32 * * t", "day of month", "too large value '32'"),
        ("* * * 13 * t", "month", "too large value '13'"),
        ("* * * 0 * t", "month", "too small value '0'"),
        ("* * * * 8 t", "day of week", "too large value '8'"),
        ("5-5 * * * * t", "minute", "invalid range '5-5'"),
        ("10-2 * * * * t", "minute", "invalid range '10-2'"),
        ("*/0 * * * * t", "minute", "invalid step"),
        ("1-10/2 * * * * t", "minute", "unsupported syntax '1-10/2'"),
        ("* * * JAN * t", "month", "unsupported syntax 'JAN'"),
        ("* * * * MON t", "day of week", "unsupported syntax 'MON'"),
        ("* * * * t", "schedule", "expected five time fields"),
        ("* * * * * 1task", "task", "invalid command"),
        ("* * * * * t ?fill=3x", "fill", "invalid time phrase '3x'"),
        ("* * * * * t ?fill=", "fill", "empty time phrase"),
        ("* * * * * t ?max=ten", "max", "invalid value 'ten'"),
        ("* * * * * t ?max=0", "max", "at least 1"),
        ("* * * * * t ?max=1&max=2", "max", "more than once"),
        ("* * * * * t ?queue=a%20b", "queue", "invalid value 'a b'"),
        ("* * * * * t ?id=9lives", "id", "invalid value '9lives'"),
        ("* * * * * t ?priority=high", "priority", "invalid value 'high'"),
        ("* * * * * t ?priority=40000", "priority", "priority must be an integer"),
        ("* * * * * t ?jobKeyMode=unsafe_dedupe", "jobKeyMode", "invalid value"),
        ("* * * * * t ?jobKey=", "jobKey", "empty"),
        ("* * * * * t ?jobKey=a%00b", "jobKey", "the job key contains a NUL character"),
        ("* * * * * t ?colour=red", "options", "unsupported option 'colour'"),
        ("* * * * * t ?tz=Mars/Olympus", "timezone", "unknown time zone"),
        ("* * * * * t {a:}", "payload", "invalid JSON5"),
        ("* * * * * t {a: NaN}", "payload", "NaN cannot be stored"),
        ("* * * * * t {'a': 1} trailing", "task", "invalid command"),
        ("* * * * * t [1, 2]", "task", "invalid command"),
    ],
)
def test_parse_errors_name_line_and_field(text: str, field: str, message: str) -> None:
    with pytest.raises(CrontabError) as caught:
        parse_crontab(f"# header\n\n* * * * * fine\n{text}\n")
    error = caught.value
    assert error.line == 4
    assert error.field == field
    assert "line 4" in str(error)
    assert field in str(error)
    assert message in str(error)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"payload": {"a": "x\0y"}}, "payload"),
        ({"payload": {"a": {"b": ["\ud800"]}}}, "payload"),
        ({"job_key": "key\0"}, "jobKey"),
        ({"queue": "q\0"}, "queue"),
        ({"id": "i\0d"}, "id"),
        ({"task": "t\0"}, "task"),
    ],
)
def test_typed_items_with_unstorable_text_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(CrontabError) as caught:
        Cron("* * * * *", **{"task": "t", **kwargs})
    assert caught.value.field == field


def test_payloads_are_converted_as_add_job_converts_them() -> None:
    when = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    item = Cron("* * * * *", "t", payload={"when": when, "tags": ("a", "b")})
    assert item.payload == {"when": "2026-01-02T03:04:00+00:00", "tags": ["a", "b"]}
    with pytest.raises(CrontabError, match="payload"):
        Cron("* * * * *", "t", payload={"n": float("nan")})
    with pytest.raises(CrontabError, match="payload"):
        Cron("* * * * *", "t", payload={"o": object()})


def test_duplicate_identifiers_are_refused() -> None:
    with pytest.raises(CrontabError, match="duplicate identifier 'a'") as caught:
        parse_crontab("* * * * * a\n\n0 * * * * b ?id=a\n0 * * * * a ?id=c\n")
    assert (caught.value.line, caught.value.field) == (3, "id")
    assert "line 3 of crontab" in str(caught.value)
    assert "first on line 1" in str(caught.value)
    # The same task twice is fine with distinct ids.
    assert len(parse_crontab("* * * * * a\n0 * * * * a ?id=a_hourly\n")) == 2
    with pytest.raises(CrontabError, match="duplicate cron identifiers: 'x'") as caught:
        load_crontab([Cron("* * * * *", "x"), Cron("0 * * * *", "y", id="x")])
    assert caught.value.field == "id"


def test_typed_form_equals_text_form() -> None:
    (parsed,) = parse_crontab(
        "0 4 * * * send_digest ?id=d&fill=2d&max=3&queue=q&jobKey=k&priority=2 {a: 1}"
    )
    typed = Cron(
        "0 4 * * *",
        task="send_digest",
        id="d",
        fill=timedelta(days=2),
        max_attempts=3,
        queue="q",
        job_key="k",
        priority=2,
        payload={"a": 1},
    )
    assert typed == parsed
    assert hash(typed) == hash(parsed)
    assert Cron("0 4 * * *", "t", fill="2d").fill == timedelta(days=2)
    assert "send_digest" in repr(typed)
    with pytest.raises(AttributeError):
        typed.task = "other"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"schedule": "0 25 * * *"}, "hour"),
        ({"schedule": "0 4 * *"}, "schedule"),
        ({"task": ""}, "task"),
        ({"task": "x" * 129}, "task"),
        ({"id": ""}, "id"),
        ({"fill": "1y"}, "fill"),
        ({"fill": timedelta(seconds=-1)}, "fill"),
        ({"max_attempts": 0}, "max"),
        ({"priority": 1 << 20}, "priority"),
        ({"queue": ""}, "queue"),
        ({"job_key": "k" * 513}, "jobKey"),
        ({"job_key_mode": "sometimes"}, "jobKeyMode"),
        ({"payload": [1, 2]}, "payload"),
        ({"payload": {"x": float("nan")}}, "payload"),
        ({"timezone": "Nowhere/Special"}, "timezone"),
    ],
)
def test_typed_form_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"schedule": "0 4 * * *", "task": "t", **kwargs}
    with pytest.raises(CrontabError) as caught:
        Cron(arguments.pop("schedule"), arguments.pop("task"), **arguments)
    assert caught.value.field == field
    assert caught.value.line is None
    assert field in str(caught.value)


def test_parse_file_and_load_crontab(tmp_path: Path) -> None:
    path = tmp_path / "crontab"
    path.write_text("# jobs\n0 4 * * * a\n*/5 * * * * b ?tz=Europe/Paris\n", encoding="utf-8")
    from_file = parse_crontab_file(path)
    assert [i.identifier for i in from_file] == ["a", "b"]
    assert from_file[1].timezone is not None and from_file[1].timezone.key == "Europe/Paris"
    assert load_crontab(path) == from_file
    assert load_crontab(path.read_text()) == from_file
    assert load_crontab(from_file) == from_file
    assert load_crontab(None) == []
    assert load_crontab("") == []
    with pytest.raises(TypeError):
        load_crontab(["0 4 * * * a"])  # type: ignore[list-item]


def test_time_phrases_and_timestamps() -> None:
    assert parse_time_phrase("30s") == timedelta(seconds=30)
    assert parse_time_phrase("1h30m") == timedelta(minutes=90)
    assert parse_time_phrase("1d1d") == timedelta(days=2)
    for bad in ("", "h", "1", "1h ", "1H", "-1h"):
        with pytest.raises(ValueError):
            parse_time_phrase(bad)
    assert format_timestamp(utc(2026, 11, 28, 14, 41)) == "2026-11-28T14:41:00.000Z"
    paris = datetime(2026, 7, 1, 9, 5, 7, 123456, tzinfo=ZoneInfo("Europe/Paris"))
    assert format_timestamp(paris) == "2026-07-01T07:05:07.123Z"
    with pytest.raises(ValueError):
        format_timestamp(datetime(2026, 1, 1))


def test_the_cron_package_keeps_its_names() -> None:
    import sqla_graphile.cron as cron

    assert sorted(cron.__all__) == sorted(
        [
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
    )
    # Importable from the package as before, though not in __all__.
    for name in [*cron.__all__, "TIME_UNITS", "ONE_MINUTE", "Clock", "ConnectionFactory", "Sleep"]:
        assert getattr(cron, name) is not None, name
    assert cron.CrontabError is CrontabError
    # One concern a module, each short enough to read.
    modules = sorted(Path(cron.__file__).parent.glob("*.py"))
    assert [m.stem for m in modules] == [
        "__init__",
        "crontab",
        "fields",
        "item",
        "scheduler",
    ]  # its statements are in the SQL registry (sqla_graphile.sql.cron)
    for module in modules:
        assert len(module.read_text(encoding="utf-8").splitlines()) < 600, module.name


# -- matching --------------------------------------------------------------------------


def days_matching(schedule: str, year: int, month: int) -> list[int]:
    item = Cron(schedule, "t")
    days = []
    day = utc(year, month, 1)
    while day.month == month:
        if item.matches(day):
            days.append(day.day)
        day += timedelta(days=1)
    return days


def test_day_of_month_and_day_of_week_rule() -> None:
    # March 2026: Fridays are 6, 13, 20, 27.
    assert days_matching("0 0 13 * *", 2026, 3) == [13]
    assert days_matching("0 0 * * 5", 2026, 3) == [6, 13, 20, 27]
    # Both restricted: either one matching is enough.
    assert days_matching("0 0 1,13 * 5", 2026, 3) == [1, 6, 13, 20, 27]
    # A field listing every value counts as unrestricted, as in Node.
    assert days_matching("0 0 1-31 * 5", 2026, 3) == [6, 13, 20, 27]
    assert days_matching("0 0 13 * 0-6", 2026, 3) == [13]
    assert days_matching("0 0 13 * 0-7", 2026, 3) == [13]


def test_weekday_seven_is_sunday() -> None:
    # March 2026: Sundays are 1, 8, 15, 22, 29; Saturdays 7, 14, 21, 28.
    assert days_matching("0 0 * * 7", 2026, 3) == [1, 8, 15, 22, 29]
    assert days_matching("0 0 * * 0", 2026, 3) == [1, 8, 15, 22, 29]
    assert days_matching("0 0 * * 6-7", 2026, 3) == [1, 7, 8, 14, 15, 21, 22, 28, 29]


def test_steps_ranges_and_lists() -> None:
    every_15 = Cron("*/15 * * * *", "t")
    assert [m for m in range(60) if every_15.matches(utc(2026, 1, 1, 0, m))] == [0, 15, 30, 45]
    mixed = Cron("5,10-12,58-59 * * * *", "t")
    assert [m for m in range(60) if mixed.matches(utc(2026, 1, 1, 0, m))] == [5, 10, 11, 12, 58, 59]
    # Steps count from the field's lowest value: days 1, 3, 5 …
    assert days_matching("0 0 */10 * *", 2026, 3) == [1, 11, 21, 31]
    # Hours, months and minutes together; seconds are ignored.
    item = Cron("30 9-17/1 * 6 *".replace("/1", ""), "t")
    assert item.matches(utc(2026, 6, 2, 9, 30, 59))
    assert not item.matches(utc(2026, 6, 2, 18, 30))
    assert not item.matches(utc(2026, 7, 2, 9, 30))
    assert not item.matches(utc(2026, 6, 2, 9, 31))
    quarterly = Cron("0 0 1 */3 *", "t")
    assert [m for m in range(1, 13) if quarterly.matches(utc(2026, m, 1))] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="aware"):
        quarterly.matches(datetime(2026, 1, 1))


def minutes_matching(item: Cron, start: datetime, hours: int) -> list[datetime]:
    return [
        start + timedelta(minutes=m)
        for m in range(hours * 60)
        if item.matches(start + timedelta(minutes=m))
    ]


def test_timezone_reads_fields_on_the_wall_clock() -> None:
    nine = Cron("0 9 * * *", "t", timezone="Europe/Paris")
    assert nine.matches(utc(2026, 1, 15, 8, 0))  # CET, UTC+1
    assert not nine.matches(utc(2026, 1, 15, 9, 0))
    assert nine.matches(utc(2026, 7, 15, 7, 0))  # CEST, UTC+2
    # Day and weekday are Paris's too: 00:30 in Paris on Monday is Sunday in UTC.
    monday = Cron("30 0 * * 1", "t", timezone="Europe/Paris")
    assert monday.matches(utc(2026, 1, 11, 23, 30))  # Sunday 23:30 UTC
    assert not Cron("30 0 * * 1", "t").matches(utc(2026, 1, 11, 23, 30))


def test_timezone_daylight_saving_transitions() -> None:
    # Paris springs forward on 2026-03-29 at 01:00 UTC (02:00 CET → 03:00 CEST).
    half_past_two = Cron("30 2 * * *", "t", timezone="Europe/Paris")
    spring = minutes_matching(half_past_two, utc(2026, 3, 28, 12), 48)
    # 02:30 did not exist on the 29th: it fires at the first minute after the gap.
    assert spring == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]
    hourly = Cron("30 * * * *", "t", timezone="Europe/Paris")
    spring_hourly = minutes_matching(hourly, utc(2026, 3, 29, 0), 3)
    assert spring_hourly == [
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 29, 1, 30),
        utc(2026, 3, 29, 2, 30),
    ]

    # Paris falls back on 2026-10-25 at 01:00 UTC (03:00 CEST → 02:00 CET).
    autumn = minutes_matching(half_past_two, utc(2026, 10, 24, 12), 48)
    # 02:30 happened twice on the 25th; it fires on the first pass only.
    assert autumn == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    # An hourly item follows the wall clock through both passes.
    autumn_hourly = minutes_matching(hourly, utc(2026, 10, 24, 23), 4)
    assert autumn_hourly == [
        utc(2026, 10, 24, 23, 30),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2, 30),
    ]


# -- the scheduler, with simulated time ------------------------------------------------


def minutes(start: datetime, end: datetime, step: int = 1) -> list[datetime]:
    """Every ``step``-th minute from ``start`` to ``end`` inclusive."""
    out = []
    while start <= end:
        out.append(start)
        start += timedelta(minutes=step)
    return out


# -- Node graphile-worker's own cron on the same crontab --------------------------------
