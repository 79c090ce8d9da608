"""Typed tasks as cron tasks: the ``_cron`` stamp is ``ctx.cron``, never a payload field.

The end-to-end test runs a real worker, its own cron included, on a clock shifted into
the past (so the jobs it schedules are due at once), against a real PostgreSQL.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, insert
from worker_fixtures import await_for, rows, running

import sqla_graphile.cron.scheduler
from sqla_graphile import (
    BatchTaskHandler,
    Hooks,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile.cron import Cron, CronInfo, CrontabError, CronTickEvent, format_timestamp
from sqla_graphile.hooks import JobFailEvent
from sqla_graphile.schema import worker_schema

UTC = timezone.utc

#: (task, decoded payload, ctx.cron, the stamp in the job's row) of every run.
runs: list[tuple[str, Any, CronInfo | None, Any]] = []
_lock = threading.Lock()


def record(name: str, payload: Any, ctx: WorkerContext) -> None:
    with _lock:
        runs.append((name, payload, ctx.cron, ctx.job.payload.get("_cron")))


@pytest.fixture(autouse=True)
def _clear() -> None:
    runs.clear()


@dataclass
class SendDigest(TaskHandler):
    IDENTIFIER: ClassVar[str] = "cron_digest"
    to: str
    count: int = 1

    def run(self, ctx: WorkerContext) -> None:
        record(self.IDENTIFIER, self, ctx)


class Reminder(BaseModel):
    text: str


@task("cron_reminder", payload_type=Reminder)
async def remind(payload: Reminder, ctx: WorkerContext) -> None:
    record("cron_reminder", payload, ctx)


@task("cron_raw")
def raw(payload: Any, ctx: WorkerContext) -> None:
    record("cron_raw", payload, ctx)


@dataclass
class IndexDoc(BatchTaskHandler):
    IDENTIFIER: ClassVar[str] = "cron_index"
    doc: int

    @classmethod
    def run_batch(cls, items: list[IndexDoc], ctx: WorkerContext) -> None:
        """Never run here."""


CRONTAB = (
    "* * * * * cron_digest ?fill=5m {to: 'ops@example.com', count: 3}\n"
    "* * * * * cron_reminder ?fill=5m {text: 'stand up'}\n"
    "* * * * * cron_raw ?fill=5m {kind: 'raw'}\n"
)
# A few seconds before a minute boundary, in the past: every job is due when added.
SIM_START = datetime(2026, 3, 2, 12, 0, 56, tzinfo=UTC)
LIVE = datetime(2026, 3, 2, 12, 1, tzinfo=UTC)


async def test_typed_cron_tasks_run_with_ctx_cron(
    engine: Engine, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = SIM_START - datetime.now(UTC)
    monkeypatch.setattr(
        sqla_graphile.cron.scheduler, "_utc_now", lambda: datetime.now(UTC) + offset
    )
    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:  # known for an hour: the last 5 minutes backfill
        connection.execute(
            insert(known),
            [
                {"identifier": name, "known_since": SIM_START - timedelta(hours=1)}
                for name in ("cron_digest", "cron_reminder", "cron_raw")
            ],
        )
    hooks = Hooks()
    ticks: list[CronTickEvent] = []
    failures: list[JobFailEvent] = []
    hooks.on("cron_tick")(ticks.append)
    hooks.on("job_fail")(failures.append)
    hooks.on("job_permanently_fail")(failures.append)
    worker = Worker(engine, [SendDigest, remind, raw], schema=schema, crontab=CRONTAB, hooks=hooks)
    # The five minutes before the start, backfilled, then the live one.
    expected_minutes = [LIVE - timedelta(minutes=n) for n in range(5, -1, -1)]
    async with running(worker):
        await await_for(
            lambda: len(runs) + len(failures) >= 3 * len(expected_minutes),
            what="the cron jobs' runs",
        )
    assert [f.error for f in failures] == []
    assert len(runs) == 3 * len(expected_minutes)
    live_tick = next(t for t in ticks if t.timestamp == LIVE)
    assert not live_tick.backfilled, "the worker took over 4 s to start its cron"

    for name in ("cron_digest", "cron_reminder", "cron_raw"):
        mine = sorted((r for r in runs if r[0] == name), key=lambda r: r[3]["ts"])
        # ctx.cron is the row's stamp, read: the minute, and whether it was backfilled.
        assert [r[2] for r in mine] == [
            CronInfo(ts, backfilled=ts < LIVE) for ts in expected_minutes
        ]
        # The row keeps the stamp exactly as Node writes it.
        assert [r[3] for r in mine] == [
            {"ts": format_timestamp(ts), "backfilled": ts < LIVE} for ts in expected_minutes
        ]
        for _, payload, _, _ in mine:
            if name == "cron_digest":
                assert payload == SendDigest(to="ops@example.com", count=3)
            elif name == "cron_reminder":
                assert payload == Reminder(text="stand up")
            else:  # untyped: the JSON as stored, as a Node handler receives it
                assert payload == {"kind": "raw", "_cron": payload["_cron"]}
    assert rows(engine, schema) == []  # every job completed


def test_stamp_from_any_writer_and_jobs_without_one(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    node_stamp = {"ts": "2026-01-02T04:00:00.000Z", "backfilled": True}
    utils.add_raw_job("cron_digest", {"to": "a@example.com", "_cron": node_stamp})
    utils.add_job(SendDigest(to="b@example.com"))  # not a cron job
    utils.add_raw_job("cron_raw", {"kind": "plain"})
    # Not a stamp: ctx.cron is None, and a typed payload still never sees the key.
    utils.add_raw_job("cron_digest", {"to": "c@example.com", "_cron": "not a stamp"})
    Worker(engine, [SendDigest, raw], schema=schema).run_once()

    assert len(runs) == 4
    stamped = next(r for r in runs if r[1] == SendDigest(to="a@example.com"))
    assert stamped[2] == CronInfo(datetime(2026, 1, 2, 4, tzinfo=UTC), backfilled=True)
    assert next(r for r in runs if r[1] == SendDigest(to="b@example.com"))[2] is None
    assert next(r for r in runs if r[1] == {"kind": "plain"})[2] is None
    assert next(r for r in runs if r[1] == SendDigest(to="c@example.com"))[2] is None
    assert rows(engine, schema) == []


@pytest.mark.parametrize(
    ("crontab", "where", "message"),
    [
        (
            "# digests\n0 4 * * * cron_digest {to: 'a@example.com', colour: 'red'}",
            "line 2 of crontab, payload",
            "unexpected keyword argument 'colour'",
        ),
        (
            "0 4 * * * cron_digest",
            "line 1 of crontab, payload",
            "missing 1 required positional argument: 'to'",
        ),
        (
            "0 4 * * * cron_reminder {text: 3}",
            "line 1 of crontab, payload",
            "ValidationError",
        ),
        (
            "0 4 * * * cron_index {doc: 1}",
            "line 1 of crontab, payload: the batch task 'cron_index'",
            "must be a JSON array",
        ),
        (
            [Cron("0 4 * * *", "cron_digest", id="digest", payload={"count": 2})],
            "cron item 'digest', payload: the typed task 'cron_digest'",
            "'to'",
        ),
    ],
)
def test_worker_refuses_cron_payloads_its_typed_task_cannot_decode(
    engine: Engine, schema: str, crontab: Any, where: str, message: str
) -> None:
    with pytest.raises(CrontabError) as info:
        Worker(engine, [SendDigest, remind, raw, IndexDoc], schema=schema, crontab=crontab)
    assert str(info.value).startswith(where)
    assert message in str(info.value)
    assert info.value.field == "payload"
    assert info.value.line == (None if isinstance(crontab, list) else crontab.count("\n") + 1)


def test_worker_accepts_decodable_untyped_and_foreign_cron_items(
    engine: Engine, schema: str
) -> None:
    crontab = (
        "0 4 * * * cron_digest {to: 'a@example.com'}\n"
        "0 5 * * * cron_raw {anything: [1, 2]}\n"
        "0 6 * * * node_only_task {whatever: true}\n"  # another worker's task
    )
    worker = Worker(engine, [SendDigest, raw], schema=schema, crontab=crontab)
    assert [item.task for item in worker.crontab] == ["cron_digest", "cron_raw", "node_only_task"]
