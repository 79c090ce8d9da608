"""Cron: Node graphile-worker's crontab format, matching, and the scheduler.

Every scheduler test runs against a real PostgreSQL; only time is simulated, through the
scheduler's injectable clock and sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Text, cast, insert, literal, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from sqla_graphile.cron import (
    Cron,
    CronJobScheduledEvent,
    CronScheduler,
    CrontabError,
    CronTickEvent,
    format_timestamp,
    parse_crontab,
)
from sqla_graphile.hooks import Hooks
from sqla_graphile.schema import quote_schema, worker_schema

UTC = timezone.utc


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


# -- parsing ---------------------------------------------------------------------------


# Each JSON5 payload, and the JSON text it stands for (what Node would send).
_UNSTORABLE_PAYLOADS = [
    (r'{a: "x\u0000y"}', r'{"a":"x\u0000y"}'),
    (r"{a: 'x\0y'}", r'{"a":"x\u0000y"}'),
    (r'{"k\u0000": 1}', r'{"k\u0000":1}'),
    (r'{a: [1, {b: "\x00"}]}', r'{"a":[1,{"b":"\u0000"}]}'),
    (r'{a: "\ud800"}', r'{"a":"\ud800"}'),
]


@pytest.mark.parametrize(("payload", "json_text"), _UNSTORABLE_PAYLOADS)
def test_payloads_postgresql_cannot_store_are_refused_when_parsed(
    engine: Engine, payload: str, json_text: str
) -> None:
    # PostgreSQL refuses this payload: scheduled, it would fail the minute, every minute.
    with engine.connect() as connection, pytest.raises(DBAPIError):
        connection.execute(select(cast(literal(json_text), JSONB)))
    with pytest.raises(CrontabError) as caught:
        parse_crontab(f"* * * * * fine\n* * * * * t {payload}\n")
    assert (caught.value.line, caught.value.field) == (2, "payload")
    assert str(caught.value).startswith("line 2 of crontab, payload: ")
    assert "NUL" in str(caught.value) or "surrogate" in str(caught.value)


async def test_near_misses_of_unstorable_payloads_are_scheduled(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    # A backslash followed by "u0000" is text, not NUL; a surrogate pair is one character.
    items = parse_crontab(
        "* * * * * backslash {a: 'x\\\\u0000y'}\n* * * * * pair {a: '\\ud83d\\ude00'}\n"
    )
    assert [i.payload for i in items] == [{"a": "x\\u0000y"}, {"a": "\U0001f600"}]
    scheduler = CronScheduler(async_engine, items, schema=schema)
    assert await scheduler.schedule_minute(utc(2026, 5, 1, 12)) == ["backslash", "pair"]
    jobs = scheduled_jobs(engine, schema)
    assert [{k: v for k, v in j.payload.items() if k != "_cron"} for j in jobs] == [
        {"a": "x\\u0000y"},
        {"a": "\U0001f600"},
    ]


# -- matching --------------------------------------------------------------------------


# -- the scheduler, with simulated time ------------------------------------------------


@dataclass
class FakeTime:
    """A clock and a sleep for one scheduler: sleeping moves the clock, nothing waits."""

    now: datetime
    until: datetime
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    slept: list[float] = field(default_factory=list)
    #: how far one sleep moves the clock, given the requested seconds
    advance: Callable[[float], float] = lambda seconds: seconds

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=self.advance(seconds))
        if self.now >= self.until:  # the simulation ends before this sleep does
            self.now = self.until
            self.stop.set()
        await asyncio.sleep(0)


async def run_scheduler(
    bind: Any,
    schema: str,
    crontab: Any,
    start: datetime,
    until: datetime,
    *,
    hooks: Hooks | None = None,
    advance: Callable[[float], float] | None = None,
) -> FakeTime:
    time = FakeTime(start, until)
    if advance is not None:
        time.advance = advance
    scheduler = CronScheduler(
        bind, crontab, schema=schema, hooks=hooks, clock=time.clock, sleep=time.sleep
    )
    await asyncio.wait_for(scheduler.run(time.stop), timeout=60)
    return time


@dataclass(frozen=True)
class ScheduledJob:
    task: str
    run_at: datetime
    payload_text: str
    queue: str | None
    priority: int
    max_attempts: int
    key: str | None

    @property
    def payload(self) -> Any:
        return json.loads(self.payload_text)

    @property
    def backfilled(self) -> bool:
        return bool(self.payload["_cron"]["backfilled"])


def scheduled_jobs(engine: Engine, schema: str) -> list[ScheduledJob]:
    tables = worker_schema(schema)
    jobs, private = tables.jobs, tables.private_jobs
    query = (
        select(
            jobs.c.task_identifier,
            jobs.c.run_at,
            cast(private.c.payload, Text),
            jobs.c.queue_name,
            jobs.c.priority,
            jobs.c.max_attempts,
            jobs.c.key,
        )
        .join(private, private.c.id == jobs.c.id)
        .order_by(jobs.c.id)
    )
    with engine.connect() as connection:
        return [ScheduledJob(*row) for row in connection.execute(query)]


def run_ats(jobs: list[ScheduledJob], task: str) -> list[datetime]:
    return [job.run_at for job in jobs if job.task == task]


def known_crontabs(engine: Engine, schema: str) -> dict[str, tuple[datetime, datetime | None]]:
    known = worker_schema(schema).private_known_crontabs
    with engine.connect() as connection:
        rows = connection.execute(select(known))
        return {row.identifier: (row.known_since, row.last_execution) for row in rows}


def minutes(start: datetime, end: datetime, step: int = 1) -> list[datetime]:
    """Every ``step``-th minute from ``start`` to ``end`` inclusive."""
    out = []
    while start <= end:
        out.append(start)
        start += timedelta(minutes=step)
    return out


async def test_tick_schedules_job_with_exact_payload_and_options(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    hooks = Hooks()
    ticks: list[CronTickEvent] = []
    scheduled: list[CronJobScheduledEvent] = []
    hooks.on("cron_tick")(ticks.append)
    hooks.on("cron_job_scheduled")(scheduled.append)
    crontab = (
        "* * * * * every_minute ?queue=cronq&priority=-3&max=7&jobKey=em&jobKeyMode=replace "
        "{b: 2, a: 'one'}\n"
        "41 14 * * * at_1441\n"
        "42 14 * * * at_1442\n"
    )
    await run_scheduler(
        async_engine,
        schema,
        crontab,
        utc(2026, 11, 28, 14, 40, 30),
        utc(2026, 11, 28, 14, 41, 0, 500_000),
        hooks=hooks,
    )
    jobs = scheduled_jobs(engine, schema)
    # The start minute is not scheduled (its boundary has passed); 14:41 is, once.
    assert [(j.task, j.run_at) for j in jobs] == [
        ("every_minute", utc(2026, 11, 28, 14, 41)),
        ("at_1441", utc(2026, 11, 28, 14, 41)),
    ]
    every, at = jobs
    assert every.payload_text == (
        '{"b":2,"a":"one","_cron":{"ts":"2026-11-28T14:41:00.000Z","backfilled":false}}'
    )
    assert (every.queue, every.priority, every.max_attempts, every.key) == ("cronq", -3, 7, "em")
    assert at.payload_text == '{"_cron":{"ts":"2026-11-28T14:41:00.000Z","backfilled":false}}'
    assert (at.queue, at.priority, at.max_attempts, at.key) == (None, 0, 25, None)
    known = known_crontabs(engine, schema)
    start = utc(2026, 11, 28, 14, 40, 30)
    assert known == {
        "every_minute": (start, utc(2026, 11, 28, 14, 41)),
        "at_1441": (start, utc(2026, 11, 28, 14, 41)),
        "at_1442": (start, None),
    }
    assert ticks == [
        CronTickEvent(
            utc(2026, 11, 28, 14, 41),
            False,
            ("every_minute", "at_1441"),
            ("every_minute", "at_1441"),
        )
    ]
    assert [(e.cron.identifier, e.timestamp, e.backfilled) for e in scheduled] == [
        ("every_minute", utc(2026, 11, 28, 14, 41), False),
        ("at_1441", utc(2026, 11, 28, 14, 41), False),
    ]
    assert all(isinstance(e.job_id, int) for e in scheduled)


async def test_late_and_early_wakeups(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    items = [Cron("* * * * *", "late"), Cron("*/2 * * * *", "early")]
    # The process stalls: one sleep lasts four minutes. Every missed minute is then
    # scheduled in turn, as live minutes (not backfilled).
    stalls = iter([240.0])
    time = await run_scheduler(
        async_engine,
        schema,
        items[:1],
        utc(2026, 5, 1, 12, 0, 10),
        utc(2026, 5, 1, 12, 6, 0, 500_000),
        advance=lambda seconds: next(stalls, seconds),
    )
    jobs = scheduled_jobs(engine, schema)
    assert run_ats(jobs, "late") == minutes(utc(2026, 5, 1, 12, 1), utc(2026, 5, 1, 12, 6))
    assert not any(j.backfilled for j in jobs)
    assert time.slept[0] == pytest.approx(50.001)

    # Timers firing early (each sleep lasts half as long as asked) re-arm, never
    # schedule a minute before it starts, and never twice.
    time = await run_scheduler(
        async_engine,
        schema,
        items[1:],
        utc(2026, 5, 2, 12, 0, 10),
        utc(2026, 5, 2, 12, 4, 0, 500_000),
        advance=lambda seconds: seconds / 2 if seconds > 1 else seconds,
    )
    jobs = scheduled_jobs(engine, schema)
    assert run_ats(jobs, "early") == [utc(2026, 5, 2, 12, 2), utc(2026, 5, 2, 12, 4)]
    assert len(time.slept) > 8  # it re-armed many times


async def test_start_on_a_minute_boundary_schedules_that_minute(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    await run_scheduler(
        async_engine,
        schema,
        "* * * * * t",
        utc(2026, 5, 1, 12, 0),
        utc(2026, 5, 1, 12, 1, 0, 500_000),
    )
    assert run_ats(scheduled_jobs(engine, schema), "t") == [
        utc(2026, 5, 1, 12, 0),
        utc(2026, 5, 1, 12, 1),
    ]


async def test_timezone_item_jobs_are_stamped_in_utc(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    crontab = [Cron("0 9 * * *", "paris_nine", timezone="Europe/Paris")]
    await run_scheduler(
        async_engine, schema, crontab, utc(2026, 7, 1, 6, 59, 30), utc(2026, 7, 1, 7, 0, 30)
    )
    (job,) = scheduled_jobs(engine, schema)
    assert job.run_at == utc(2026, 7, 1, 7, 0)
    assert job.payload["_cron"] == {"ts": "2026-07-01T07:00:00.000Z", "backfilled": False}


async def test_backfill_after_a_five_hour_gap(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    crontab = (
        "* * * * * every ?fill=6h\n"
        "*/10 * * * * tens ?fill=6h\n"
        "0 * * * * hourly ?fill=2h\n"
        "*/30 * * * * nofill\n"
    )
    await run_scheduler(
        async_engine,
        schema,
        crontab,
        utc(2026, 1, 10, 8, 0, 30),
        utc(2026, 1, 10, 8, 5, 0, 500_000),
    )
    first = scheduled_jobs(engine, schema)
    assert run_ats(first, "every") == minutes(utc(2026, 1, 10, 8, 1), utc(2026, 1, 10, 8, 5))

    # Five hours later, with an item never seen before.
    later = crontab + "* * * * * newcomer ?fill=1d\n"
    restart = utc(2026, 1, 10, 13, 5, 30)
    await run_scheduler(async_engine, schema, later, restart, utc(2026, 1, 10, 13, 6, 0, 500_000))
    jobs = scheduled_jobs(engine, schema)
    by_task = {task: run_ats(jobs, task) for task in ("every", "tens", "hourly", "nofill")}

    # Every minute exactly once: the first run's five, then the gap, then live.
    assert by_task["every"] == minutes(utc(2026, 1, 10, 8, 1), utc(2026, 1, 10, 13, 6))
    every = [j for j in jobs if j.task == "every"]
    assert [j.backfilled for j in every] == [False] * 5 + [True] * 300 + [False]
    # Not before the item was known (08:00:30), within its 6 hours.
    assert by_task["tens"] == minutes(utc(2026, 1, 10, 8, 10), utc(2026, 1, 10, 13, 0), 10)
    # Only the hours within its 2-hour fill (11:00 is 2h05m30s before the restart).
    assert by_task["hourly"] == [utc(2026, 1, 10, 12, 0), utc(2026, 1, 10, 13, 0)]
    # No fill, no backfill: nothing between the runs.
    assert by_task["nofill"] == []
    # A new identifier is never backfilled; it becomes known at the restart.
    assert run_ats(jobs, "newcomer") == [utc(2026, 1, 10, 13, 6)]
    assert known_crontabs(engine, schema)["newcomer"][0] == restart
    for job in jobs:
        assert job.payload["_cron"]["ts"] == format_timestamp(job.run_at)
        if job.backfilled:
            assert job.run_at < restart
    assert len({(j.task, j.run_at) for j in jobs}) == len(jobs)


async def test_backfill_after_a_25_hour_gap(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    crontab = "0 * * * * hourly ?fill=1d\n15 3 * * * daily ?fill=1d\n*/20 * * * * short ?fill=1h\n"
    await run_scheduler(
        async_engine,
        schema,
        crontab,
        utc(2026, 2, 1, 9, 59, 30),
        utc(2026, 2, 1, 10, 0, 0, 500_000),
    )
    assert run_ats(scheduled_jobs(engine, schema), "hourly") == [utc(2026, 2, 1, 10)]
    # The last job was at 10:00; the next start is 25 hours later.
    restart = utc(2026, 2, 2, 11, 0, 30)
    await run_scheduler(async_engine, schema, crontab, restart, utc(2026, 2, 2, 11, 1, 0, 500_000))
    jobs = scheduled_jobs(engine, schema)
    hourly = [j for j in jobs if j.task == "hourly"]
    # 11:00 on the first day is more than a day before the restart: lost for good.
    expected = [utc(2026, 2, 1, 10), *minutes(utc(2026, 2, 1, 12), utc(2026, 2, 2, 11), 60)]
    assert [j.run_at for j in hourly] == expected
    assert [j.backfilled for j in hourly] == [False] + [True] * 24
    assert [(j.run_at, j.backfilled) for j in jobs if j.task == "daily"] == [
        (utc(2026, 2, 2, 3, 15), True)
    ]
    # A one-hour fill reaches back to 10:01 only.
    assert [(j.run_at, j.backfilled) for j in jobs if j.task == "short"] == [
        (utc(2026, 2, 1, 10, 0), False),
        (utc(2026, 2, 2, 10, 20), True),
        (utc(2026, 2, 2, 10, 40), True),
        (utc(2026, 2, 2, 11, 0), True),
    ]
    assert known_crontabs(engine, schema)["hourly"][1] == utc(2026, 2, 2, 11)


async def test_two_schedulers_schedule_each_minute_once(
    async_engine: AsyncEngine, engine: Engine, schema: str, database_url: str
) -> None:
    crontab = "* * * * * shared ?fill=30m {x: 1}\n*/3 * * * * third ?fill=1h&queue=q\n"
    # Both processes knew the items an hour ago, so both backfill, concurrently.
    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:
        connection.execute(
            insert(known),
            [
                {"identifier": name, "known_since": utc(2026, 3, 3, 11), "last_execution": None}
                for name in ("shared", "third")
            ],
        )
    per_process: list[list[tuple[str, datetime]]] = [[], []]
    runs = []
    for index, offset in enumerate((0.0, 7.0)):  # their clocks disagree by 7 seconds
        hooks = Hooks()
        hooks.on("cron_job_scheduled")(
            lambda e, sink=per_process[index]: sink.append((e.cron.identifier, e.timestamp))
        )
        start = utc(2026, 3, 3, 12, 0, 20) + timedelta(seconds=offset)
        runs.append(
            run_scheduler(
                async_engine if index == 0 else database_url,
                schema,
                crontab,
                start,
                start + timedelta(minutes=10),
                hooks=hooks,
            )
        )
    await asyncio.gather(*runs)
    jobs = scheduled_jobs(engine, schema)
    assert run_ats(jobs, "shared") == minutes(utc(2026, 3, 3, 11, 31), utc(2026, 3, 3, 12, 10))
    assert run_ats(jobs, "third") == minutes(utc(2026, 3, 3, 11, 3), utc(2026, 3, 3, 12, 9), 3)
    first, second = (set(p) for p in per_process)
    assert not first & second
    assert first | second == {(j.task, j.run_at) for j in jobs}


async def test_errors_restart_with_backoff_and_rerun_backfill(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    failures = iter(range(2))

    @asynccontextmanager
    async def flaky_connect() -> Any:
        if next(failures, None) is not None:
            raise ConnectionError("database unreachable")
        async with async_engine.connect() as connection:
            yield connection

    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:
        connection.execute(
            insert(known).values(
                identifier="t", known_since=utc(2026, 4, 1, 9), last_execution=None
            )
        )
    time = await run_scheduler(
        flaky_connect,
        schema,
        "*/5 * * * * t ?fill=1h",
        utc(2026, 4, 1, 10, 0, 30),
        utc(2026, 4, 1, 10, 5, 0, 500_000),
    )
    # Two failed starts, two backoffs (200 ms, then 300 ms, each with ±50 % jitter).
    assert 0.1 <= time.slept[0] <= 0.3
    assert 0.15 <= time.slept[1] <= 0.45
    jobs = scheduled_jobs(engine, schema)
    assert [(j.run_at, j.backfilled) for j in jobs] == [
        (t, True) for t in minutes(utc(2026, 4, 1, 9, 5), utc(2026, 4, 1, 10, 0), 5)
    ] + [(utc(2026, 4, 1, 10, 5), False)]


def refuse_doomed_jobs(engine: Engine, schema: str) -> None:
    """Make the database refuse every job whose payload has the key ``doomed``."""
    q = quote_schema(schema)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"create function {q}.refuse_doomed() returns trigger language plpgsql as $$"
                " begin if new.payload::jsonb ? 'doomed' then"
                " raise exception 'doomed job refused'; end if; return new; end $$"
            )
        )
        connection.execute(
            text(
                f"create trigger refuse_doomed before insert on {q}._private_jobs"
                f" for each row execute function {q}.refuse_doomed()"
            )
        )


async def test_a_refused_job_does_not_stop_the_other_items(
    async_engine: AsyncEngine, engine: Engine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    refuse_doomed_jobs(engine, schema)
    caplog.set_level(logging.ERROR, logger="sqla_graphile.cron")
    hooks = Hooks()
    ticks: list[CronTickEvent] = []
    hooks.on("cron_tick")(ticks.append)
    crontab = (
        "* * * * * before\n"
        "* * * * * doomed {doomed: true}\n"
        "*/2 * * * * after ?queue=q {fine: true}\n"
        "1 12 * * * alone_doomed ?fill=1h {doomed: 'alone'}\n"
    )
    start = utc(2026, 5, 1, 11, 59, 30)
    await run_scheduler(
        async_engine, schema, crontab, start, utc(2026, 5, 1, 12, 3, 0, 500_000), hooks=hooks
    )
    jobs = scheduled_jobs(engine, schema)
    every = minutes(utc(2026, 5, 1, 12, 0), utc(2026, 5, 1, 12, 3))
    assert run_ats(jobs, "before") == every
    assert run_ats(jobs, "after") == [utc(2026, 5, 1, 12, 0), utc(2026, 5, 1, 12, 2)]
    assert run_ats(jobs, "doomed") == run_ats(jobs, "alone_doomed") == []
    # Each minute: the refused items are reported, the others scheduled.
    assert [(t.timestamp, t.scheduled, t.failed) for t in ticks] == [
        (utc(2026, 5, 1, 12, 0), ("before", "after"), ("doomed",)),
        (utc(2026, 5, 1, 12, 1), ("before",), ("doomed", "alone_doomed")),
        (utc(2026, 5, 1, 12, 2), ("before", "after"), ("doomed",)),
        (utc(2026, 5, 1, 12, 3), ("before",), ("doomed",)),
    ]
    # A refused item's minute is not claimed: nothing says it ran.
    known = known_crontabs(engine, schema)
    assert known["doomed"] == (start, None)
    assert known["before"] == (start, utc(2026, 5, 1, 12, 3))
    # Each refusal is logged with the item, the minute and the database's reason; the
    # scheduler never restarted.
    messages = [r.getMessage() for r in caplog.records if r.name == "sqla_graphile.cron"]
    assert len(messages) == 5
    assert all("doomed job refused" in m for m in messages)
    assert sum("'doomed'" in m for m in messages) == 4
    assert "'alone_doomed'" in messages[2] and "2026-05-01T12:01:00.000Z" in messages[2]
    assert not any("restarting" in m for m in messages)


async def test_a_refused_job_alone_in_its_minute_is_logged_and_skipped(
    async_engine: AsyncEngine, engine: Engine, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    refuse_doomed_jobs(engine, schema)
    caplog.set_level(logging.ERROR, logger="sqla_graphile.cron")
    time = await run_scheduler(
        async_engine,
        schema,
        "* * * * * doomed {doomed: 1}\n",
        utc(2026, 5, 1, 11, 59, 30),
        utc(2026, 5, 1, 12, 2, 0, 500_000),
    )
    assert scheduled_jobs(engine, schema) == []
    messages = [r.getMessage() for r in caplog.records if r.name == "sqla_graphile.cron"]
    assert len(messages) == 3 and all("doomed job refused" in m for m in messages)
    # No backoff: the scheduler only ever slept until the next minute.
    assert all(seconds > 1 for seconds in time.slept)


async def test_run_returns_when_stop_is_set(async_engine: AsyncEngine, schema: str) -> None:
    stop = asyncio.Event()
    scheduler = CronScheduler(async_engine, "0 0 1 1 * yearly", schema=schema)
    task = asyncio.ensure_future(scheduler.run(stop))
    await asyncio.sleep(0.2)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=10)


# -- Node graphile-worker's own cron on the same crontab --------------------------------

NODE_SCRIPT = r"""
import { EventEmitter } from "node:events";
import { pathToFileURL } from "node:url";

// Node's cron reads only the process clock: shift it to the test's simulated time.
const RealDate = Date;
let offset = 0;
class ShiftedDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(RealDate.now() + offset);
    else super(...args);
  }
  static now() {
    return RealDate.now() + offset;
  }
}
globalThis.Date = ShiftedDate;

const { run } = await import(pathToFileURL(process.env.GW_INDEX).href);
const events = new EventEmitter();
events.on("cron:started", () => console.log("CRON_STARTED " + Date.now()));
offset = Number(process.env.SIM_START_MS) - RealDate.now();
const runner = await run({
  connectionString: process.env.DATABASE_URL,
  schema: process.env.GW_SCHEMA,
  crontab: process.env.CRONTAB,
  taskList: { node_only_noop: async () => {} },
  concurrency: 1,
  pollInterval: 60000,
  noHandleSignals: true,
  events,
});
const stopAt = Number(process.env.SIM_STOP_MS);
while (Date.now() < stopAt) await new Promise((resolve) => setTimeout(resolve, 50));
await runner.stop();
console.log("NODE_DONE");
"""


@pytest.mark.node
async def test_node_and_python_share_a_crontab(
    node_dir: Path,
    database_url: str,
    async_engine: AsyncEngine,
    engine: Engine,
    schema: str,
    tmp_path: Path,
) -> None:
    """Node 0.18's own cron and ours, on one crontab: each minute once between them.

    Python runs first (simulated 09:30:30 to 09:45); Node then starts at a simulated
    10:00:56 and backfills from where Python stopped; Python starts again beside it once
    Node's backfill is done, and the two race for the live minute 10:01.
    """
    node = shutil.which("node")
    assert node is not None
    crontab = (
        "* * * * * interop_every ?fill=1h {who: 'either'}\n"
        "*/2 * * * * interop_even ?id=even&fill=30m&queue=cronq\n"
    )
    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:
        connection.execute(
            insert(known),
            [
                {"identifier": name, "known_since": utc(2026, 6, 1, 8), "last_execution": None}
                for name in ("interop_every", "even")
            ],
        )
    python_did: set[tuple[str, datetime]] = set()
    hooks = Hooks()
    hooks.on("cron_job_scheduled")(lambda e: python_did.add((e.cron.task, e.timestamp)))

    # 1. Python alone, in simulated time.
    await run_scheduler(
        async_engine,
        schema,
        crontab,
        utc(2026, 6, 1, 9, 30, 30),
        utc(2026, 6, 1, 9, 45, 0, 500_000),
        hooks=hooks,
    )
    phase_one = set(python_did)

    # 2. Node, its clock shifted to 4 s before 10:01; it stops at 10:01:03.
    sim_start = utc(2026, 6, 1, 10, 0, 56)
    sim_stop = utc(2026, 6, 1, 10, 1, 3)
    live = utc(2026, 6, 1, 10, 1)
    script = tmp_path / "cron_interop.mjs"
    script.write_text(NODE_SCRIPT, encoding="utf-8")
    env = {
        **os.environ,
        "SIM_START_MS": str(int(sim_start.timestamp() * 1000)),
        "SIM_STOP_MS": str(int(sim_stop.timestamp() * 1000)),
        "GW_INDEX": str(node_dir / "node_modules" / "graphile-worker" / "dist" / "index.js"),
        "DATABASE_URL": database_url,
        "GW_SCHEMA": schema,
        "CRONTAB": crontab,
    }
    process = await asyncio.create_subprocess_exec(
        node, str(script), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout = process.stdout
    assert stdout is not None
    output: list[str] = []
    try:

        async def node_cron_started() -> datetime:
            while True:
                line = await stdout.readline()
                if not line:
                    raise AssertionError("Node exited before its cron started")
                output.append(line.decode())
                if line.startswith(b"CRON_STARTED "):
                    return datetime.fromtimestamp(int(line.split()[1]) / 1000, UTC)

        node_now = await asyncio.wait_for(node_cron_started(), timeout=45)
        assert node_now < live, "Node took over 4 s to start its cron; the test needs less"
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def shifted_now() -> datetime:  # Node's simulated clock, read from here
            return node_now + timedelta(seconds=loop.time() - t0)

        # 3. Python again, beside Node, on Node's simulated clock (real sleeps).
        stop = asyncio.Event()
        scheduler = CronScheduler(
            async_engine, crontab, schema=schema, hooks=hooks, clock=shifted_now
        )
        runner = asyncio.ensure_future(scheduler.run(stop))
        while shifted_now() < sim_stop:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(runner, timeout=30)
        rest, errors = await asyncio.wait_for(process.communicate(), timeout=45)
        output.append(rest.decode())
        assert process.returncode == 0, errors.decode()[-3000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "NODE_DONE" in "".join(output)

    jobs = scheduled_jobs(engine, schema)
    # Each minute once between the two processes.
    every = sorted(run_ats(jobs, "interop_every"))
    even = sorted(run_ats(jobs, "interop_even"))
    assert every == minutes(utc(2026, 6, 1, 8, 31), live)
    assert even == minutes(utc(2026, 6, 1, 9, 2), utc(2026, 6, 1, 10, 0), 2)
    assert len({(j.task, j.run_at) for j in jobs}) == len(jobs)
    python_backfill = utc(2026, 6, 1, 9, 30)
    python_last = utc(2026, 6, 1, 9, 45)
    for job in jobs:
        assert job.payload["_cron"]["ts"] == format_timestamp(job.run_at)
        backfilled = job.run_at <= python_backfill or python_last < job.run_at < live
        assert job.backfilled == backfilled, job
        if job.task == "interop_every":
            assert job.payload == {"who": "either", "_cron": job.payload["_cron"]}
        else:
            assert job.queue == "cronq"
    # Python did 08:31 to 09:45; Node backfilled from Python's last execution to 10:00
    # (Python was not running then); 10:01 went to whichever process came first.
    assert phase_one == {(j.task, j.run_at) for j in jobs if j.run_at <= python_last}
    assert python_did - phase_one <= {(j.task, j.run_at) for j in jobs if j.run_at == live}
    rows = known_crontabs(engine, schema)
    assert rows["interop_every"] == (utc(2026, 6, 1, 8), live)
    assert rows["even"] == (utc(2026, 6, 1, 8), utc(2026, 6, 1, 10, 0))
