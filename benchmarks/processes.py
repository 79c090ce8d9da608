"""Processes benchmark: CPU-bound jobs with one worker process, then two, supervised.

    python benchmarks/processes.py [--database-url URL] [--quick] [--repeats N] [--json PATH]

A ``def`` handler that computes in pure Python holds the GIL, so one worker process runs
such jobs on one core whatever its ``concurrency``. :class:`sqla_graphile.supervisor.
Supervisor` runs one worker per process; this measures how the throughput of CPU-bound
jobs scales from one process to two (target: at least 1.7× on a machine with two cores
to spare).

Each round queues the jobs on a freshly truncated schema, starts the supervisor, and
counts the jobs left every 20 ms. The rate is taken between the moment 5 % of the jobs
are done (the processes are started and warm) and the moment 10 % are left (before the
tail, where processes run out of work one after the other). Rounds alternate the order
of the two configurations; the best round of each is kept. The exit status is 0 even
when the target is missed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from common import Schemas, database_url, parser, verdict, versions
from sqlalchemy import create_engine, text

from sqla_graphile import Worker, WorkerContext, task
from sqla_graphile.schema import quote_schema
from sqla_graphile.supervisor import Supervisor, WorkerSlot

#: Loop iterations of one job: a few milliseconds of one core (7.6 ms on the 2-core VM).
WORK = 150_000
TARGET = 1.7
#: Fractions of the jobs done and left between which the rate is measured.
WARM, TAIL = 0.05, 0.10

ADD_JOBS_SQL = """
select count(*) from {schema}.add_jobs(
  array(select json_populate_recordset(null::{schema}.job_spec, %s::json)),
  false
)
"""


@task("burn")
def burn(payload: Any, ctx: WorkerContext) -> None:
    """CPU-bound: pure Python arithmetic, holding the GIL throughout."""
    total = 0
    for i in range(payload["n"]):
        total += i * i % 7


@dataclass(frozen=True)
class BenchWorkers:
    """The factory each worker process calls (pickled to it)."""

    url: str
    schema: str

    def __call__(self, slot: WorkerSlot) -> Worker:
        return Worker(self.url, [burn], schema=self.schema, concurrency=1, poll_interval=0.1)


@dataclass(frozen=True)
class Sizes:
    jobs: int
    repeats: int


FULL = Sizes(1_500, 3)
QUICK = Sizes(400, 1)


@dataclass
class Database(Schemas):
    @property
    def sqlalchemy_url(self) -> str:
        return self.url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)

    def queue(self, schema: str, count: int) -> None:
        q = quote_schema(schema)
        with self.engine.begin() as connection:
            connection.execute(text(f"truncate {q}._private_jobs, {q}._private_job_queues"))
        specs = [{"identifier": "burn", "payload": {"n": WORK}} for _ in range(count)]
        with psycopg.connect(self.conninfo, autocommit=True) as connection:
            connection.execute(ADD_JOBS_SQL.format(schema=q), (json.dumps(specs),))
            connection.execute(f"analyze {q}._private_jobs")

    def remaining(self, connection: psycopg.Connection[Any], schema: str) -> int:
        row = connection.execute(
            f"select count(*) from {quote_schema(schema)}._private_jobs"
        ).fetchone()
        return int(row[0]) if row else 0


def one_round(db: Database, schema: str, processes: int, jobs: int) -> float:
    """Jobs per second of ``processes`` supervised worker processes, warm, before the tail."""
    db.queue(schema, jobs)
    supervisor = Supervisor(BenchWorkers(db.sqlalchemy_url, schema), processes)
    thread = threading.Thread(target=supervisor.run, name="supervisor")
    start: tuple[float, int] | None = None
    end: tuple[float, int] | None = None
    thread.start()
    try:
        with psycopg.connect(db.conninfo, autocommit=True) as connection:
            while end is None:
                left = db.remaining(connection, schema)
                now = time.perf_counter()
                if start is None and left <= jobs * (1 - WARM):
                    start = (now, left)
                elif start is not None and left <= jobs * TAIL:
                    end = (now, left)
                if not thread.is_alive():
                    raise RuntimeError("the supervisor stopped early")
                time.sleep(0.02)
    finally:
        supervisor.request_shutdown()
        thread.join()
    assert start is not None
    return (start[1] - end[1]) / (end[0] - start[0])


def calibrate() -> float:
    """Milliseconds of one job's work in this process (no worker around it)."""
    began = time.perf_counter()
    for _ in range(5):
        burn({"n": WORK}, None)
    return (time.perf_counter() - began) / 5 * 1000


def main(argv: list[str] | None = None) -> int:
    options = parser(
        (__doc__ or "").split("\n\n")[0],
        quick="fewer jobs, one round",
        repeats="rounds per configuration (the best is kept)",
    )
    args = options.parse_args(argv)
    url = database_url(args, options)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or sizes.repeats
    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    db = Database(url, engine)
    environment: dict[str, Any] = {
        **versions(engine, None),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    print("processes benchmark: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    job_ms = calibrate()
    print(
        f"{sizes.jobs:,} CPU-bound jobs of about {job_ms:.1f} ms each, concurrency 1 per "
        f"process, best of {repeats} round(s)\n"
    )
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        schema = db.fresh_schema("processes")
        for round_number in range(repeats):
            order = (1, 2) if round_number % 2 == 0 else (2, 1)
            for processes in order:
                rate = one_round(db, schema, processes, sizes.jobs)
                rates[processes].append(rate)
                print(f"round {round_number + 1}: {processes} process(es): {rate:,.1f} jobs/s")
    finally:
        db.drop_schemas()
        engine.dispose()
    environment["load_after"] = [round(x, 2) for x in os.getloadavg()]
    one, two = max(rates[1]), max(rates[2])
    ratio = two / one
    print(f"\n1 process:   {one:,.1f} jobs/s")
    print(f"2 processes: {two:,.1f} jobs/s")
    print(f"ratio:       {ratio:.2f}x (target >= {TARGET}x: {verdict(ratio >= TARGET)})")
    print(f"\nload average before {environment['load_before']}, after {environment['load_after']}")
    if args.json:
        document = {
            "environment": environment,
            "sizes": {**sizes.__dict__, "repeats": repeats, "job_ms": job_ms},
            "rates": {str(k): v for k, v in rates.items()},
            "ratio": ratio,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
