"""Mixed fleets, cron: Node's cron and our worker's, on one crontab, each minute once.

Both processes run on one simulated clock, a fixed offset from the real one (Node's
``Date`` is shifted; our scheduler's clock is patched), a few seconds before a minute
boundary. Both backfill the last ten minutes (the items were known an hour earlier) and
then race for the live minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from interop_fixtures import NodeProcess
from json5_vectors import CHANGED, CHANGED_READER_ONLY, LENIENT_KEYS, PAYLOADS, READER_ONLY
from sqlalchemy import Engine, insert, text
from worker_fixtures import await_for, running

import sqla_graphile.cron.scheduler
from sqla_graphile import Hooks, Worker, task
from sqla_graphile.cron import CrontabError, format_timestamp, parse_crontab
from sqla_graphile.cron.crontab import loads_json5
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


# Node's json5, as graphile-worker 0.18 imports it, reads each vector: its value as JSON
# (a non-finite number as {"nonFinite": text}), or null if it refuses the text.
JSON5_SCRIPT = """
import { createRequire } from "module";
import { readFileSync } from "fs";
const fromWorker = createRequire(createRequire(process.env.FIXTURE).resolve("graphile-worker"));
const JSON5 = fromWorker("json5");
const replace = (key, value) =>
  typeof value === "number" && !Number.isFinite(value) ? { nonFinite: String(value) } : value;
const results = JSON.parse(readFileSync(0, "utf8")).map((text) => {
  try {
    return JSON.stringify(JSON5.parse(text), replace);
  } catch {
    return null;
  }
});
console.log(JSON.stringify(results));
"""


def _as_javascript(value: Any) -> Any:
    """``value`` with every number a double, as JavaScript has them."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_as_javascript(item) for item in value]
    return {key: _as_javascript(item) for key, item in value.items()}


def _json_cannot_hold(value: Any) -> str | None:
    """Why PostgreSQL cannot hold Node's ``value`` as JSON, if it cannot."""
    if isinstance(value, dict) and set(value) == {"nonFinite"}:
        return "JSON"  # NaN, Infinity or a number beyond a double's range
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "lone surrogate"
        return "NUL" if "\0" in value else None
    items = [*value, *value.values()] if isinstance(value, dict) else value
    if isinstance(items, list):
        return next((why for item in items if (why := _json_cannot_hold(item))), None)
    return None


def _read(payload: str) -> Any:
    """What a crontab line makes of ``payload``, or the error refusing it; what the reader
    alone makes of it if it cannot be a crontab line's payload."""
    try:
        if len(f"* * * * * t {payload}".splitlines()) == 1:
            (item,) = parse_crontab(f"* * * * * t {payload}")
            return item.payload
    except CrontabError as exc:
        if exc.field != "task":  # else the line's grammar refused it: ask the reader
            return exc
    try:
        return loads_json5(payload)
    except ValueError as exc:
        return exc


def test_payloads_are_read_as_nodes_json5_reads_them(node_dir: Path, tmp_path: Path) -> None:
    """Every vector, read here and by Node's json5: the same value (numbers compared as
    JavaScript doubles, since integers stay exact here), or both refuse; except values
    PostgreSQL cannot store, which Node takes and this package refuses, and two escaped keys
    (json5_vectors.LENIENT_KEYS)."""
    node = shutil.which("node")
    assert node is not None
    vectors = [text for text, _ in PAYLOADS + READER_ONLY + CHANGED + CHANGED_READER_ONLY]
    script = tmp_path / "json5_vectors.mjs"
    script.write_text(JSON5_SCRIPT, encoding="utf-8")
    completed = subprocess.run(
        [node, str(script)],
        input=json.dumps(vectors),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "FIXTURE": str(node_dir / "package.json")},
        timeout=60,
        check=True,
    )
    readings = json.loads(completed.stdout)
    assert len(readings) == len(vectors)
    agreed = 0
    for payload, reading in zip(vectors, readings, strict=True):
        ours = _read(payload)
        if payload in LENIENT_KEYS:
            assert reading is None and not isinstance(ours, ValueError), payload
            continue
        if reading is None:
            assert isinstance(ours, ValueError), f"Node refuses {payload!r}; we read {ours!r}"
            agreed += 1
            continue
        nodes = json.loads(reading)
        if why := _json_cannot_hold(nodes):
            assert isinstance(ours, ValueError) and why in str(ours), payload
            continue
        assert not isinstance(ours, ValueError), f"Node reads {payload!r}; we refuse: {ours}"
        assert _as_javascript(ours) == nodes, payload
        agreed += 1
    assert agreed > 200  # most vectors are neither lenient nor beyond JSON
