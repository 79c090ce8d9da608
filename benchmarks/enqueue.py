"""Enqueue benchmark: Node graphile-worker 0.18 and sqla-graphile, same database, one run.

    python benchmarks/enqueue.py [--database-url URL] [--quick] [--repeats N] [--json PATH]

Measures, each implementation on its own freshly migrated worker schema, after a warm-up:

1. ``add_jobs`` of many jobs in batches: Node's ``workerUtils.addJobs`` vs our
   ``WorkerUtils.add_raw_jobs`` (engine-bound: one transaction per batch); then the
   fastest bulk add of each: Node's bare ``add_jobs`` SQL counting its rows vs our
   ``WorkerUtils.bulk_add_raw_jobs``, with the CPU per job of each side and of the
   PostgreSQL backends serving it.
2. ``add_job`` with one commit each: Node's ``addJob`` vs ours through an ORM ``Session``,
   and the bare ``select * from add_job(...)`` through psycopg, for our overhead.
3. ``add_job`` inside an already open transaction: microseconds per job.
4. The asyncio twin of 2 (``AsyncWorkerUtils`` on psycopg async), beside the bare SQL
   through ``psycopg.AsyncConnection`` with a commit each (the same round trips), and the
   caller's own ``AsyncSession`` transaction writing one row to a table with no index
   instead of a job: no ``add_job`` inside such a transaction can be faster.

The work of a round is cut into slices that the implementations take in turn (rotating
who goes first), so a machine busy with something else slows them all alike; each figure
is the best of the rounds. Node runs, through the small script in ``benchmarks/node``, on
the schema our migrations created: that is the compatibility contract. The exit status
is 0 even when a target is missed.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from common import (
    Schemas,
    ServerCpu,
    database_url,
    named,
    parser,
    process_cpu,
    verdict,
    versions,
)
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sqla_graphile import AsyncWorkerUtils, RawJobSpec, WorkerUtils
from sqla_graphile.schema import quote_schema

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = HERE / "node" / "enqueue.mjs"
IDENTIFIER = "bench_task"

# The statements Node graphile-worker 0.18 sends, for the bare SQL baselines.
ADD_JOB_SQL = """
select * from {schema}.add_job(
  identifier => %s::text,
  payload => %s::json,
  queue_name => %s::text,
  run_at => %s::timestamptz,
  max_attempts => %s::int,
  job_key => %s::text,
  priority => %s::int,
  flags => %s::text[],
  job_key_mode => %s::text
)
"""
ADD_JOBS_SQL = """
select * from {schema}.add_jobs(
  array(select json_populate_recordset(null::{schema}.job_spec, %s::json)),
  %s::boolean
)
"""


def payload(i: int) -> dict[str, Any]:
    """The payload of job number ``i`` (the Node script builds the same)."""
    return {"i": i, "to": f"user{i}@example.com", "subject": "Welcome"}


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    batch_total: int
    batch_size: int
    batch_slice: int
    batch_warmup: int
    single: int
    single_slice: int
    single_warmup: int
    repeats: int


FULL = Sizes(20_000, 1_000, 5_000, 2_000, 2_000, 200, 200, 3)
QUICK = Sizes(5_000, 1_000, 1_000, 1_000, 400, 100, 50, 1)


# -- the implementations measured -----------------------------------------------------

Run = Callable[[int, int], float]
"""``run(start, count)``: add ``count`` jobs numbered from ``start``; the timed seconds."""
Opener = Callable[[str], tuple[Run, Callable[[], None]]]
"""``open(schema)``: a ``run`` function on that schema, and how to close it."""


@dataclass
class Side:
    """One implementation measured: its label, how to run it, and its round timings.

    A side with an ``app`` (the ``application_name`` of its connections) also has its
    CPU time measured per round: the client's (``pid``, a Node process, or this one) and
    the server's (its PostgreSQL backends).
    """

    label: str
    open: Opener
    seconds: list[float] = field(default_factory=list)
    schema: str = ""
    app: str | None = None
    pid: list[int] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float | None] = field(default_factory=list)

    def cpu_us(self, count: int) -> tuple[float, float | None]:
        """Client and server CPU microseconds per job, in the best round."""
        best = self.seconds.index(self.best)
        server = self.server_cpu[best]
        return (
            self.client_cpu[best] / count * 1e6,
            None if server is None else server / count * 1e6,
        )

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def per_job_us(self, count: int) -> float:
        return self.best / count * 1e6

    def rate(self, count: int) -> float:
        return count / self.best


@dataclass(kw_only=True)
class Context(Schemas):
    """The benchmark database: engines, the node executable, the schemas created."""

    async_engine: AsyncEngine
    loop: asyncio.AbstractEventLoop
    node: str | None

    def reset(self, schema: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text(f"truncate {quote_schema(schema)}._private_jobs"))


@dataclass(frozen=True)
class Plan:
    """One measurement's sizes: jobs per round, slice, warm-up, rounds."""

    count: int
    slice: int
    warmup: int
    repeats: int


def measure(ctx: Context, name: str, sides: list[Side], plan: Plan) -> dict[str, Side]:
    """Run ``sides`` on fresh schemas: warm-up, then rounds of interleaved slices."""
    opened: list[Callable[[], None]] = []
    runs: dict[str, Run] = {}
    try:
        for side in sides:
            side.schema = ctx.fresh_schema(f"{name}_{side.label}")
            run, close = side.open(side.schema)
            opened.append(close)
            runs[side.label] = run
        for side in sides:
            runs[side.label](0, plan.warmup)
        start = plan.warmup
        for _ in range(plan.repeats):
            for side in sides:
                ctx.reset(side.schema)
            totals = dict.fromkeys(runs, 0.0)
            client = dict.fromkeys(runs, 0.0)
            server: dict[str, float | None] = dict.fromkeys(runs, 0.0)
            for k in range(plan.count // plan.slice):
                for side in sides[k % len(sides) :] + sides[: k % len(sides)]:
                    if side.app is None:
                        totals[side.label] += runs[side.label](start, plan.slice)
                        continue
                    before = process_cpu(side.pid[0]) if side.pid else None
                    with ServerCpu(ctx.conninfo, side.app) as cpu:
                        totals[side.label] += runs[side.label](start, plan.slice)
                    after = process_cpu(side.pid[0]) if side.pid else None
                    if before is not None and after is not None:
                        client[side.label] += after - before
                    else:
                        client[side.label] += cpu.own
                    spent = server[side.label]
                    if spent is not None and cpu.seconds is not None:
                        server[side.label] = spent + cpu.seconds
                    else:
                        server[side.label] = None
                start += plan.slice
            for side in sides:
                side.seconds.append(totals[side.label])
                side.client_cpu.append(client[side.label])
                side.server_cpu.append(server[side.label])
    finally:
        for close in opened:
            close()
    return {side.label: side for side in sides}


# -- Node ---------------------------------------------------------------------------


def node_side(ctx: Context, mode: str, batch: int = 0, *, cpu: bool = False) -> Side:
    """Node's WorkerUtils in a long-lived process, driven slice by slice over stdin.

    ``cpu``: its CPU time and its backends' are measured too.
    """
    node = ctx.node
    assert node is not None
    app = f"bench_{ctx.token}_node_{mode}" if cpu else None
    pids: list[int] = []

    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        conninfo = ctx.conninfo
        if app is not None:
            conninfo = named(ctx.url, app).render_as_string(hide_password=False)
        options: dict[str, Any] = {"connectionString": conninfo, "schema": schema, "mode": mode}
        if batch:
            options["batch"] = batch
        process = subprocess.Popen(
            [node, str(NODE_SCRIPT), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin, process.stdout
        pids.append(process.pid)

        def read() -> dict[str, Any]:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"the Node script exited ({process.wait()}); see its stderr")
            return dict(json.loads(line))

        read()  # ready

        def run(start: int, count: int) -> float:
            stdin.write(json.dumps({"start": start, "count": count}) + "\n")
            stdin.flush()
            return float(read()["seconds"])

        def close() -> None:
            stdin.close()
            process.wait(timeout=30)

        return run, close

    return Side("node", open_, app=app, pid=pids)


# -- ours, and the bare SQL baselines -------------------------------------------------


def _nothing() -> None:
    pass


def ours_add_jobs(ctx: Context, batch: int) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        utils = WorkerUtils(ctx.engine, schema)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for offset in range(start, start + count, batch):
                end = min(offset + batch, start + count)
                utils.add_raw_jobs([RawJobSpec(IDENTIFIER, payload(i)) for i in range(offset, end)])
            return time.perf_counter() - started

        return run, _nothing

    return Side("ours", open_)


def ours_bulk_add(ctx: Context, batch: int) -> Side:
    """``WorkerUtils.bulk_add_raw_jobs`` on an engine of its own (its backends are named)."""
    app = f"bench_{ctx.token}_ours_bulk"

    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        engine = create_engine(named(ctx.url, app).set(drivername="postgresql+psycopg"))
        utils = WorkerUtils(engine, schema)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for offset in range(start, start + count, batch):
                end = min(offset + batch, start + count)
                utils.bulk_add_raw_jobs(
                    [RawJobSpec(IDENTIFIER, payload(i)) for i in range(offset, end)]
                )
            return time.perf_counter() - started

        return run, engine.dispose

    return Side("ours_bulk", open_, app=app)


def bare_add_jobs(ctx: Context, batch: int) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        sql = ADD_JOBS_SQL.format(schema=quote_schema(schema))
        connection = psycopg.connect(ctx.conninfo)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for offset in range(start, start + count, batch):
                end = min(offset + batch, start + count)
                specs = [
                    {"identifier": IDENTIFIER, "payload": payload(i)} for i in range(offset, end)
                ]
                connection.execute(sql, (json.dumps(specs), False)).fetchall()
                connection.commit()
            return time.perf_counter() - started

        return run, connection.close

    return Side("bare_sql", open_)


def ours_add_job_session(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        utils = WorkerUtils(ctx.engine, schema)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for i in range(start, start + count):
                with Session(ctx.engine) as session, session.begin():
                    utils.using(session).add_raw_job(IDENTIFIER, payload(i))
            return time.perf_counter() - started

        return run, _nothing

    return Side("ours_session", open_)


def ours_add_job_engine(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        utils = WorkerUtils(ctx.engine, schema)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for i in range(start, start + count):
                utils.add_raw_job(IDENTIFIER, payload(i))
            return time.perf_counter() - started

        return run, _nothing

    return Side("ours_engine", open_)


def _add_job_params(i: int) -> tuple[Any, ...]:
    return (IDENTIFIER, json.dumps(payload(i)), None, None, None, None, None, None, None)


def bare_add_job(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        sql = ADD_JOB_SQL.format(schema=quote_schema(schema))
        connection = psycopg.connect(ctx.conninfo)

        def run(start: int, count: int) -> float:
            started = time.perf_counter()
            for i in range(start, start + count):
                connection.execute(sql, _add_job_params(i)).fetchone()
                connection.commit()
            return time.perf_counter() - started

        return run, connection.close

    return Side("bare_sql", open_)


def ours_add_job_in_tx(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        def run(start: int, count: int) -> float:
            with Session(ctx.engine) as session, session.begin():
                utils = WorkerUtils(session, schema)
                session.execute(text("select 1"))  # the transaction is open before timing
                started = time.perf_counter()
                for i in range(start, start + count):
                    utils.add_raw_job(IDENTIFIER, payload(i))
                return time.perf_counter() - started

        return run, _nothing

    return Side("ours", open_)


def bare_add_job_in_tx(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        sql = ADD_JOB_SQL.format(schema=quote_schema(schema))
        connection = psycopg.connect(ctx.conninfo)

        def run(start: int, count: int) -> float:
            connection.execute("select 1")  # the transaction is open before timing
            started = time.perf_counter()
            for i in range(start, start + count):
                connection.execute(sql, _add_job_params(i)).fetchone()
            seconds = time.perf_counter() - started
            connection.commit()
            return seconds

        return run, connection.close

    return Side("bare_sql", open_)


def ours_add_job_async(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        utils = AsyncWorkerUtils(ctx.async_engine, schema)

        async def go(start: int, count: int) -> float:
            started = time.perf_counter()
            for i in range(start, start + count):
                async with AsyncSession(ctx.async_engine) as session, session.begin():
                    await utils.using(session).add_raw_job(IDENTIFIER, payload(i))
            return time.perf_counter() - started

        return (lambda start, count: ctx.loop.run_until_complete(go(start, count))), _nothing

    return Side("ours_async_session", open_)


def floor_session_async(ctx: Context) -> Side:
    """The caller's transaction alone, writing one row to a table with no index."""

    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        scratch = f"{quote_schema(schema)}.bench_scratch"
        with ctx.engine.begin() as connection:
            connection.execute(text(f"create table if not exists {scratch} (x int)"))
        insert = text(f"insert into {scratch} values (1)")

        async def go(start: int, count: int) -> float:
            started = time.perf_counter()
            for _ in range(start, start + count):
                async with AsyncSession(ctx.async_engine) as session, session.begin():
                    await session.execute(insert)
            return time.perf_counter() - started

        return (lambda start, count: ctx.loop.run_until_complete(go(start, count))), _nothing

    return Side("floor_async_session", open_)


def bare_add_job_async(ctx: Context) -> Side:
    def open_(schema: str) -> tuple[Run, Callable[[], None]]:
        sql = ADD_JOB_SQL.format(schema=quote_schema(schema))
        connection = ctx.loop.run_until_complete(psycopg.AsyncConnection.connect(ctx.conninfo))

        async def go(start: int, count: int) -> float:
            started = time.perf_counter()
            for i in range(start, start + count):
                await (await connection.execute(sql, _add_job_params(i))).fetchone()
                await connection.commit()
            return time.perf_counter() - started

        def run(start: int, count: int) -> float:
            return ctx.loop.run_until_complete(go(start, count))

        def close() -> None:
            ctx.loop.run_until_complete(connection.close())

        return run, close

    return Side("bare_sql_async", open_)


# -- reporting ----------------------------------------------------------------------


def jobs_per_s(value: float) -> str:
    return f"{value:,.0f} jobs/s"


def versus_node(
    sides: dict[str, Side],
    ours: Side,
    count: int,
    entry: dict[str, Any],
    table: list[tuple[str, str, str, str, str]],
    *,
    row: str,
    node_name: str = "node",
    ours_name: str = "ours",
    node_cell: str = "",
    position: int | None = None,
) -> str:
    """Ours against Node's side (target 1.00x): the ratio into ``entry``, a row into
    ``table`` (at ``position``, else last), and the text for the printed line."""
    if "node" not in sides:
        return f"{ours_name} {jobs_per_s(ours.rate(count))}"
    node_rate, ours_rate = sides["node"].rate(count), ours.rate(count)
    ratio = ours_rate / node_rate
    met = ratio >= 1.0
    entry.update(ratio=ratio, target=1.0, met=met)
    cells = (
        row,
        jobs_per_s(node_rate) + node_cell,
        jobs_per_s(ours_rate),
        f"{ratio:.2f}x",
        f">= 1.00x {verdict(met)}",
    )
    table.insert(len(table) if position is None else position, cells)
    return (
        f"{node_name} {jobs_per_s(node_rate)}, {ours_name} {jobs_per_s(ours_rate)}, "
        f"ratio {ratio:.2f}x  [target >= 1.00x: {verdict(met)}]"
    )


def sides_json(sides: dict[str, Side], count: int) -> dict[str, Any]:
    return {
        label: {
            "round_seconds": side.seconds,
            "best_seconds": side.best,
            "median_seconds": side.median,
            "jobs_per_second": side.rate(count),
            "us_per_job": side.per_job_us(count),
        }
        for label, side in sides.items()
    }


def main(argv: list[str] | None = None) -> int:
    options = parser(
        (__doc__ or "").split("\n\n")[0],
        quick="small sizes, one round",
        repeats="rounds per measurement (the best is kept)",
    )
    args = options.parse_args(argv)
    url = database_url(args, options)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or sizes.repeats

    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    async_engine = create_async_engine(url.set(drivername="postgresql+psycopg_async"))
    loop = asyncio.new_event_loop()
    node = args.node if args.node and NODE_SCRIPT.exists() else None
    ctx = Context(url=url, engine=engine, async_engine=async_engine, loop=loop, node=node)
    environment = versions(engine, node)
    print("enqueue benchmark: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    print(f"best of {repeats} round(s); each implementation on its own migrated schema\n")
    if not node:
        print("node not found: only our side is measured, no ratios\n")

    results: dict[str, Any] = {}
    table: list[tuple[str, str, str, str, str]] = []

    def with_node(mode: str, batch: int = 0, *, cpu: bool = False) -> list[Side]:
        """Node's side of a measurement, when Node is here."""
        return [node_side(ctx, mode, batch, cpu=cpu)] if node else []

    try:
        # 1. add_jobs in batches, one transaction per batch
        n, b = sizes.batch_total, sizes.batch_size
        plan = Plan(n, sizes.batch_slice, sizes.batch_warmup, repeats)
        s = measure(
            ctx,
            "add_jobs",
            [*with_node("add_jobs", b), ours_add_jobs(ctx, b), bare_add_jobs(ctx, b)],
            plan,
        )
        entry: dict[str, Any] = {"count": n, "batch": b, "sides": sides_json(s, n)}
        line = f"add_jobs {n} (batches of {b}): "
        line += versus_node(s, s["ours"], n, entry, table, row=f"add_jobs {n}/{b}")
        bare_overhead = s["ours"].best / s["bare_sql"].best - 1.0
        entry["overhead_vs_bare_sql"] = bare_overhead
        line += (
            f"\n    bare SQL (psycopg) {jobs_per_s(s['bare_sql'].rate(n))}: "
            f"our overhead {bare_overhead:+.1%}  (information)"
        )
        results["add_jobs"] = entry
        print(line, flush=True)

        # 1b. the fastest bulk add: Node's bare add_jobs SQL (count only) and our
        # bulk_add_raw_jobs (a count, no Job objects), with the CPU each side spends
        s = measure(
            ctx,
            "bulk",
            [*with_node("add_jobs_sql", b, cpu=True), ours_bulk_add(ctx, b)],
            plan,
        )
        entry = {"count": n, "batch": b, "sides": sides_json(s, n)}
        ours_side = s["ours_bulk"]
        cpu_line = ""
        for label, side in s.items():
            client_us, server_us = side.cpu_us(n)
            entry["sides"][label].update(
                client_cpu_us_per_job=client_us, server_cpu_us_per_job=server_us
            )
            server_cell = "n/a" if server_us is None else f"{server_us:.1f}"
            cpu_line += (
                f"\n    CPU per job, {label}: client {client_us:.1f} us, "
                f"PostgreSQL backends {server_cell} us (best round)"
            )
            table.append(
                (
                    f"CPU per job, bulk: {label}",
                    f"client {client_us:.1f} us",
                    f"server {server_cell} us",
                    "",
                    "(information)",
                )
            )
        line = f"bulk add {n} (batches of {b}), count only: "
        line += versus_node(
            s,
            ours_side,
            n,
            entry,
            table,
            row=f"bulk add {n}/{b}, count only",
            node_name="node bare add_jobs SQL",
            ours_name="ours bulk_add_raw_jobs",
            node_cell=" (bare SQL)",
            position=len(table) - len(s),
        )
        results["bulk_add"] = entry
        print(line + cpu_line, flush=True)

        # 2. add_job, one commit each
        n = sizes.single
        plan = Plan(n, sizes.single_slice, sizes.single_warmup, repeats)
        s = measure(
            ctx,
            "add_job",
            [
                *with_node("add_job"),
                ours_add_job_session(ctx),
                bare_add_job(ctx),
                ours_add_job_engine(ctx),
            ],
            plan,
        )
        entry = {"count": n, "sides": sides_json(s, n)}
        ours, bare = s["ours_session"], s["bare_sql"]
        overhead = ours.best / bare.best - 1.0
        entry.update(overhead_vs_bare_sql=overhead, overhead_target=0.10)
        entry["overhead_met"] = overhead < 0.10
        line = f"add_job x{n}, one commit each: "
        line += versus_node(
            s, ours, n, entry, table, row=f"add_job x{n} (Session)", ours_name="ours (Session)"
        )
        added = ours.per_job_us(n) - bare.per_job_us(n)
        line += (
            f"\n    bare SQL (psycopg, one commit each) {jobs_per_s(bare.rate(n))}: "
            f"our overhead {overhead:+.1%} ({added:+.0f} us/job)"
            f"  [target < 10%: {verdict(overhead < 0.10)}]"
            f"\n    ours engine-bound (no Session) {jobs_per_s(s['ours_engine'].rate(n))}"
            "  (information)"
        )
        table.append(
            (
                f"add_job x{n} vs bare SQL",
                jobs_per_s(bare.rate(n)) + " (bare)",
                jobs_per_s(ours.rate(n)),
                f"{overhead:+.1%}",
                f"< 10% {verdict(overhead < 0.10)}",
            )
        )
        results["add_job"] = entry
        print(line, flush=True)

        # 3. add_job inside an open transaction
        s = measure(
            ctx,
            "add_job_tx",
            [*with_node("add_job_tx"), ours_add_job_in_tx(ctx), bare_add_job_in_tx(ctx)],
            plan,
        )
        entry = {"count": n, "sides": sides_json(s, n)}
        us = {label: side.per_job_us(n) for label, side in s.items()}
        added = us["ours"] - us["bare_sql"]
        entry["added_us_per_job_over_bare_sql"] = added
        line = (
            f"add_job x{n} in an open transaction: ours {us['ours']:.0f} us/job, "
            f"bare SQL {us['bare_sql']:.0f} us/job: ours adds {added:+.0f} us/job "
            f"({us['ours'] / us['bare_sql'] - 1:+.1%})"
        )
        if "node" in us:
            line += f"\n    node, its add_job SQL on one client: {us['node']:.0f} us/job"
        table.append(
            (
                f"add_job x{n} in a transaction",
                f"{us['bare_sql']:.0f} us/job (bare)",
                f"{us['ours']:.0f} us/job",
                f"{added:+.0f} us/job",
                "(added time)",
            )
        )
        results["add_job_in_transaction"] = entry
        print(line, flush=True)

        # 4. the asyncio twin of 2, for information
        s = measure(
            ctx,
            "add_job_async",
            [
                *with_node("add_job"),
                ours_add_job_async(ctx),
                bare_add_job_async(ctx),
                floor_session_async(ctx),
            ],
            plan,
        )
        entry = {"count": n, "sides": sides_json(s, n)}
        ours, bare = s["ours_async_session"], s["bare_sql_async"]
        overhead = ours.best / bare.best - 1.0
        entry["overhead_vs_bare_sql"] = overhead
        line = f"add_job x{n} async, one commit each: "
        line += versus_node(
            s,
            ours,
            n,
            entry,
            table,
            row=f"add_job x{n} (AsyncSession)",
            ours_name="ours (AsyncSession)",
        )
        bare_ratio = bare.rate(n) / s["node"].rate(n) if "node" in s else None
        line += (
            f"\n    bare SQL (psycopg async, BEGIN + statement + COMMIT) {jobs_per_s(bare.rate(n))}"
            f": our overhead {overhead:+.1%}"
        )
        if bare_ratio is not None:
            entry["bare_sql_ratio_to_node"] = bare_ratio
            line += f"; the bare call itself is {bare_ratio:.2f}x Node's addJob (what bounds ours)"
        floor = s["floor_async_session"]
        line += (
            "\n    the caller's AsyncSession transaction writing one row to a table with no "
            f"index (BEGIN, insert, COMMIT, close) {floor.rate(n):,.0f} transactions/s"
        )
        if "node" in s:
            floor_ratio = floor.rate(n) / s["node"].rate(n)
            entry["floor_session_ratio_to_node"] = floor_ratio
            line += f": {floor_ratio:.2f}x Node's addJob, a ceiling for any add_job inside one"
            table.append(
                (
                    "AsyncSession txn, 1-row insert",
                    jobs_per_s(s["node"].rate(n)),
                    f"{floor.rate(n):,.0f} txn/s",
                    f"{floor_ratio:.2f}x",
                    "(ceiling)",
                )
            )
        results["add_job_async"] = entry
        print(line, flush=True)
    finally:
        ctx.drop_schemas()
        loop.run_until_complete(async_engine.dispose())
        loop.close()
        engine.dispose()

    header = ("measurement", "node (or bare SQL)", "ours", "ratio", "target")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    print()
    for row in [header, *table]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())

    if args.json:
        document = {"environment": environment, "repeats": repeats, "results": results}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
