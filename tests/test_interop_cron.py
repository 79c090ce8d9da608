"""Mixed fleets, cron: Node's cron and our worker's, on one crontab, each minute once.

Both processes run on one simulated clock, a fixed offset from the real one (Node's
``Date`` is shifted; our scheduler's clock is patched), a few seconds before a minute
boundary. Both backfill the last ten minutes (the items were known an hour earlier) and
then race for the live minute.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from interop_fixtures import NodeProcess
from sqlalchemy import Engine, insert, text
from worker_fixtures import await_for, running

import sqla_graphile.cron.scheduler
from sqla_graphile import Hooks, Worker, task
from sqla_graphile.cron import format_timestamp
from sqla_graphile.schema import quote_schema, worker_schema

pytestmark = pytest.mark.node

UTC = timezone.utc
CRONTAB = (
    "* * * * * interop_tick ?fill=10m {who: 'either'}\n"
    "*/2 * * * * interop_even ?id=even&fill=10m&queue=cronq&priority=-1\n"
)
SIM_START = datetime(2026, 6, 1, 12, 0, 50, tzinfo=UTC)
LIVE = datetime(2026, 6, 1, 12, 1, tzinfo=UTC)


def minutes(start: datetime, end: datetime, step: int = 1) -> list[datetime]:
    out = []
    while start <= end:
        out.append(start)
        start += timedelta(minutes=step)
    return out


@task("py_noop")
def py_noop(payload: Any, ctx: Any) -> None:
    """Our worker needs a task; the cron tasks are left for nobody to run."""


async def test_node_cron_and_our_worker_cron_schedule_each_minute_once(
    node_dir: Path,
    database_url: str,
    engine: Engine,
    schema: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offset = SIM_START - datetime.now(UTC)

    def simulated_now() -> datetime:
        return datetime.now(UTC) + offset

    monkeypatch.setattr(sqla_graphile.cron.scheduler, "_utc_now", simulated_now)
    known = worker_schema(schema).private_known_crontabs
    with engine.begin() as connection:
        connection.execute(
            insert(known),
            [
                {"identifier": name, "known_since": SIM_START - timedelta(hours=1)}
                for name in ("interop_tick", "even")
            ],
        )
    python_did: set[tuple[str, datetime]] = set()
    hooks = Hooks()
    hooks.on("cron_job_scheduled")(lambda e: python_did.add((e.cron.task, e.timestamp)))

    node = NodeProcess(
        node_dir,
        database_url,
        tmp_path / "node.log",
        clock_offset_ms=round(offset.total_seconds() * 1000),
    )
    try:
        node.start_pool("cron", schema, {"node_noop": {}}, poll_interval_ms=60_000, crontab=CRONTAB)
        started = node.wait_event(lambda e: e["event"] == "cronStarted", what="Node's cron")
        node_start = datetime.fromtimestamp(started["start"] / 1000, UTC)
        worker = Worker(engine, [py_noop], schema=schema, crontab=CRONTAB, hooks=hooks)
        async with running(worker):
            python_start = simulated_now()
            assert node_start < LIVE and python_start < LIVE, (
                f"both must start before {LIVE} (simulated): Node at {node_start},"
                f" Python at {python_start}; the test needs faster starts"
            )
            await await_for(
                lambda: simulated_now() > LIVE + timedelta(seconds=3),
                timeout=30,
                what="the live minute",
            )
        node.call("stop", name="cron")
    finally:
        node.close()

    q = quote_schema(schema)
    with engine.connect() as connection:
        jobs = connection.execute(
            text(
                "select t.identifier as task, j.run_at, j.payload::text as payload,"
                f" q.queue_name, j.priority from {q}._private_jobs j"
                f" join {q}._private_tasks t on t.id = j.task_id"
                f" left join {q}._private_job_queues q on q.id = j.job_queue_id order by j.id"
            )
        ).all()
    tick = sorted(j.run_at for j in jobs if j.task == "interop_tick")
    even = sorted(j.run_at for j in jobs if j.task == "interop_even")
    # Backfill from ten minutes before the starts (rounded up), then the live minute.
    assert tick == minutes(datetime(2026, 6, 1, 11, 51, tzinfo=UTC), LIVE)
    assert even == minutes(datetime(2026, 6, 1, 11, 52, tzinfo=UTC), LIVE - timedelta(minutes=1), 2)
    for job in jobs:
        payload = json.loads(job.payload)
        assert payload["_cron"] == {
            "ts": format_timestamp(job.run_at),
            "backfilled": job.run_at < LIVE,
        }
        if job.task == "interop_tick":
            assert (payload["who"], job.queue_name, job.priority) == ("either", None, 0)
        else:
            assert (set(payload), job.queue_name, job.priority) == ({"_cron"}, "cronq", -1)
    # What our worker scheduled is among them; Node scheduled the rest.
    assert python_did <= {(j.task, j.run_at) for j in jobs}
    with engine.connect() as connection:
        last = dict(
            connection.execute(
                text(f"select identifier, last_execution from {q}._private_known_crontabs")
            ).all()
        )
    assert last == {"interop_tick": LIVE, "even": LIVE - timedelta(minutes=1)}
    print(
        f"\ncron: our worker scheduled {len(python_did)} of {len(jobs)} jobs,"
        f" Node {len(jobs) - len(python_did)}"
    )
