"""Worker benchmark: Node graphile-worker 0.18 and sqla-graphile, same database, one run.

    python benchmarks/worker.py [--database-url URL] [--quick] [--repeats N] [--json PATH]
    python benchmarks/worker.py --otel [--quick] [--repeats N]

Measures, each configuration on its own freshly migrated worker schema:

1. Throughput: many no-op jobs at concurrency 10, queued first with one ``add_jobs``
   call; the worker is timed from its start until it has finished them all (run-once
   mode), minus its startup (the same run on an empty queue), as Node's perfTest does.
   Node with its defaults and with its perfTest batching (local queue of 500, batched
   completions and failures); ours with its defaults (a ``def`` and an ``async def``
   no-op handler) and with batched settings.
2. Idle pick-up latency: an idle worker, jobs added one at a time in the worker's own
   process with the ``add_job`` statement Node's ``addJob`` sends (autocommit); the time
   from that statement returning (its commit acknowledged) to the handler's first line.
   Median and 90th percentile of the samples of several short rounds, each after a
   warm-up.

With ``--otel`` only our batched configuration runs, without instrumentation and with
``sqla_graphile.otel`` (job metrics, queue gauges and tracing: with ``sample_runs=0.01``,
the setting for busy workers, which the target is for; with every duration recorded;
with every job traced and the SDK's sampler keeping 1 %; with every run recorded), its
spans and metrics exported through the SDK's batching processor and periodic reader to
exporters that drop them: the overhead of instrumentation, printed as ratios to the run
without it, with this process's CPU per job.

Rounds rotate who goes first, so a machine busy with something else slows all alike;
throughput is the best round. Node runs, through ``benchmarks/node/worker.mjs``, on a
schema our migrations created. The exit status is 0 even when a target is missed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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

from sqla_graphile import Hooks, Worker, WorkerContext, task
from sqla_graphile.schema import quote_schema

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = HERE / "node" / "worker.mjs"
CONCURRENCY = 10

# One add_jobs call for the whole batch, as Node's perfTest queues its jobs.
ADD_JOBS_SQL = """
select count(*) from {schema}.add_jobs(
  array(select json_populate_recordset(null::{schema}.job_spec, %s::json)),
  false
)
"""

# The statement Node's workerUtils.addJob sends (defaults for every option).
ADD_JOB_SQL = """
select * from {schema}.add_job(identifier => 'latency'::text, payload => %s::json)
"""

#: Targets, as ratios to Node's same configuration: throughput at least, latency at most.
DEFAULTS_TARGET = 5.0
BATCHED_TARGET = 1.5
LATENCY_TARGET = 0.8

#: Our batched configuration: a larger local queue (batched writes are the default).
OURS_BATCHED: dict[str, Any] = {"local_queue_size": 500}

#: With tracing and metrics on (``sample_runs=0.01``), batched throughput at least this
#: share of it without.
OTEL_TARGET = 0.9


@dataclass(frozen=True)
class Sizes:
    jobs: int
    repeats: int
    latency_count: int
    latency_warmup: int
    latency_rounds: int


FULL = Sizes(20_000, 3, 400, 20, 5)
QUICK = Sizes(5_000, 1, 50, 20, 1)


# -- handlers ---------------------------------------------------------------------------


@task("noop")
def noop(payload: Any, ctx: WorkerContext) -> None:
    pass


@task("noop")
async def async_noop(payload: Any, ctx: WorkerContext) -> None:
    pass


# -- the database -----------------------------------------------------------------------


@dataclass
class Database(Schemas):
    @property
    def sqlalchemy_url(self) -> str:
        return self.url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)

    def app(self, label: str) -> str:
        """The ``application_name`` of a configuration's connections (see ``ServerCpu``)."""
        return f"bench_{self.token}_{label}"

    def named_url(self, label: str, *, driver: str = "postgresql") -> str:
        url = named(self.url, self.app(label)).set(drivername=driver)
        return url.render_as_string(hide_password=False)

    def reset(self, schema: str) -> None:
        q = quote_schema(schema)
        with self.engine.begin() as connection:
            connection.execute(text(f"truncate {q}._private_jobs, {q}._private_job_queues"))

    def queue(self, schema: str, count: int) -> None:
        """Queue ``count`` no-op jobs with one ``add_jobs`` call; analyse the table."""
        specs = [{"identifier": "noop", "payload": {"i": i}} for i in range(count)]
        with psycopg.connect(self.conninfo, autocommit=True) as connection:
            sql = ADD_JOBS_SQL.format(schema=quote_schema(schema))
            connection.execute(sql, (json.dumps(specs),))
            # The same fresh statistics for everyone, whatever autovacuum is up to.
            connection.execute(f"analyze {quote_schema(schema)}._private_jobs")

    def remaining(self, schema: str) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.scalar(
                    text(f"select count(*) from {quote_schema(schema)}._private_jobs")
                )
                or 0
            )


# -- the configurations -----------------------------------------------------------------


class NodeProcess:
    """A long-lived ``worker.mjs`` driven over stdin."""

    def __init__(
        self, node: str, db: Database, schema: str, *, batched: bool, label: str = ""
    ) -> None:
        options = {
            "connectionString": db.named_url(label) if label else db.conninfo,
            "schema": schema,
            "concurrency": CONCURRENCY,
            "batched": batched,
        }
        self.process = subprocess.Popen(
            [node, str(NODE_SCRIPT), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.version = str(self.ask(None)["version"])

    def ask(self, command: dict[str, Any] | None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the Node script exited ({self.process.wait()}); see its stderr")
        return dict(json.loads(line))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@dataclass
class Config:
    """One configuration measured: how it runs a queue once, and its timings."""

    label: str
    description: str
    run_once: Callable[[str], float]
    """``run_once(schema)``: work the schema's queue until empty; seconds it took."""
    schema: str = ""
    startup: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)
    left_over: list[int] = field(default_factory=list)
    app: str | None = None
    """The ``application_name`` of its connections: its CPU time is measured."""
    pid: int | None = None
    """Its process, when not this one (Node's)."""
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float | None] = field(default_factory=list)
    """Per round: CPU seconds of the run less those of its startup run."""

    def cpu_us(self, jobs: int) -> tuple[float, float | None] | None:
        """Client and server CPU microseconds per job in the best round (if measured)."""
        if not self.client_cpu:
            return None
        best = self.rates(jobs).index(self.best(jobs))
        server = self.server_cpu[best]
        return self.client_cpu[best] / jobs * 1e6, None if server is None else server / jobs * 1e6

    def timed(self, db: Database) -> tuple[float, float, float | None]:
        """Run the queue once: seconds, and the client's and the server's CPU seconds."""
        if self.app is None:
            return self.run_once(self.schema), 0.0, None
        before = process_cpu(self.pid) if self.pid is not None else None
        with ServerCpu(db.conninfo, self.app, interval=0.05) as cpu:
            seconds = self.run_once(self.schema)
        after = process_cpu(self.pid) if self.pid is not None else None
        client = after - before if before is not None and after is not None else cpu.own
        return seconds, client, cpu.seconds

    def rates(self, jobs: int) -> list[float]:
        base = min(self.startup)
        return [jobs / max(seconds - base, 1e-9) for seconds in self.rounds]

    def best(self, jobs: int) -> float:
        return max(self.rates(jobs))


def node_once(process: NodeProcess) -> Callable[[str], float]:
    return lambda schema: float(process.ask({"cmd": "once"})["seconds"])


def ours_once(
    db: Database,
    handler: Any,
    settings: dict[str, Any],
    hooks: Callable[[], Hooks] | None = None,
    label: str = "",
) -> Callable[[str], float]:
    """Run a fresh worker once; ``hooks`` makes the hooks of each (instrumented) run.

    ``label`` names its connections (``Database.app``), so its server CPU can be told.
    """
    url = db.named_url(label, driver="postgresql+psycopg") if label else db.sqlalchemy_url

    def run(schema: str) -> float:
        worker = Worker(
            url,
            [handler],
            schema=schema,
            concurrency=CONCURRENCY,
            hooks=hooks() if hooks is not None else None,
            **settings,
        )
        started = time.perf_counter()
        worker.run_once()
        seconds = time.perf_counter() - started
        worker.close()
        return seconds

    return run


def measure_throughput(db: Database, configs: list[Config], sizes: Sizes, repeats: int) -> None:
    for config in configs:
        if not config.schema:
            config.schema = db.fresh_schema(config.label)
        config.run_once(config.schema)  # warm-up: connections, imports, JIT
    for round_ in range(repeats):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            db.reset(config.schema)
            startup, startup_client, startup_server = config.timed(db)
            config.startup.append(startup)
            db.queue(config.schema, sizes.jobs)
            seconds, client, server = config.timed(db)
            config.rounds.append(seconds)
            config.left_over.append(db.remaining(config.schema))
            rate = sizes.jobs / max(config.rounds[-1] - min(config.startup), 1e-9)
            line = f"  round {round_ + 1}: {config.label:<16} {rate:>9,.0f} jobs/s"
            if config.app is not None:
                config.client_cpu.append(max(0.0, client - startup_client))
                # A startup run too short for the poller to see a backend counts as none.
                spent = None if server is None else max(0.0, server - (startup_server or 0.0))
                config.server_cpu.append(spent)
                per_job = config.client_cpu[-1] / sizes.jobs * 1e6
                line += f"  CPU per job: client {per_job:.1f} us"
                if spent is not None:
                    line += f", PostgreSQL {spent / sizes.jobs * 1e6:.1f} us"
            print(line, flush=True)


# -- latency ----------------------------------------------------------------------------


@dataclass
class Latency:
    label: str
    from_commit_ms: list[float]
    from_call_ms: list[float]

    def median(self) -> float:
        return statistics.median(self.from_commit_ms)

    def p90(self) -> float:
        return _percentile(self.from_commit_ms, 0.9)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _ours_latency(
    db: Database, schema: str, is_async: bool, sizes: Sizes
) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    arrival: list[asyncio.Future[float]] = []

    def arrived(at: float) -> None:
        if arrival and not arrival[-1].done():
            arrival[-1].set_result(at)

    if is_async:

        @task("latency")
        async def handler(payload: Any, ctx: WorkerContext) -> None:
            arrived(time.perf_counter())

    else:

        @task("latency")
        def handler(payload: Any, ctx: WorkerContext) -> None:
            loop.call_soon_threadsafe(arrived, time.perf_counter())

    worker = Worker(db.sqlalchemy_url, [handler], schema=schema, concurrency=CONCURRENCY)
    # Jobs are added with the statement Node's addJob sends, autocommit, so "committed"
    # means the same instant on both sides (our WorkerUtils is measured by enqueue.py).
    connection = await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True)
    sql = ADD_JOB_SQL.format(schema=quote_schema(schema))
    running = asyncio.create_task(worker.run_async())
    from_commit: list[float] = []
    from_call: list[float] = []
    try:
        while not worker.listening:
            if running.done():
                await running
            await asyncio.sleep(0.01)
        for i in range(sizes.latency_warmup + sizes.latency_count):
            arrival.append(loop.create_future())
            called = time.perf_counter()
            await connection.execute(sql, (json.dumps({"i": i}),))
            committed = time.perf_counter()
            at = await asyncio.wait_for(arrival[-1], 30)
            if i >= sizes.latency_warmup:
                from_commit.append((at - committed) * 1000)
                from_call.append((at - called) * 1000)
    finally:
        worker.request_shutdown()
        await running
        await connection.close()
        worker.close()
    return from_commit, from_call


def ours_latency(db: Database, label: str, is_async: bool, sizes: Sizes) -> Latency:
    schema = db.fresh_schema(label)
    commit, call = asyncio.run(_ours_latency(db, schema, is_async, sizes))
    return Latency(label, commit, call)


def node_latency(node: str, db: Database, sizes: Sizes) -> Latency:
    schema = db.fresh_schema("lat_node")
    process = NodeProcess(node, db, schema, batched=False)
    try:
        answer = process.ask(
            {"cmd": "latency", "count": sizes.latency_count, "warmup": sizes.latency_warmup}
        )
    finally:
        process.close()
    return Latency("node", answer["from_commit_ms"], answer["from_call_ms"])


# -- reporting --------------------------------------------------------------------------


def throughput(
    db: Database,
    node: str | None,
    sizes: Sizes,
    repeats: int,
    environment: dict[str, Any],
    results: dict[str, Any],
    table: list[tuple[str, str, str, str, str]],
) -> None:
    configs: list[Config] = []
    processes: list[NodeProcess] = []
    try:
        if node:
            for batched in (False, True):
                label = "node_batched" if batched else "node_default"
                schema = db.fresh_schema(label)
                process = NodeProcess(node, db, schema, batched=batched, label=label)
                processes.append(process)
                environment["graphile_worker"] = process.version
                description = (
                    "Node, localQueue 500 + batched completions/failures (perfTest config)"
                    if batched
                    else "Node, defaults"
                )
                configs.append(
                    Config(
                        label,
                        description,
                        node_once(process),
                        schema,
                        app=db.app(label),
                        pid=process.process.pid,
                    )
                )
        ours_configs = [
            ("ours_default", "ours, defaults, def handler", noop, {}),
            ("ours_default_async", "ours, defaults, async def handler", async_noop, {}),
            ("ours_batched", "ours, local_queue_size=500, def handler", noop, OURS_BATCHED),
            (
                "ours_batched_async",
                "ours, local_queue_size=500, async def handler",
                async_noop,
                OURS_BATCHED,
            ),
        ]
        for label, description, handler, settings in ours_configs:
            run = ours_once(db, handler, settings, label=label)
            configs.append(Config(label, description, run, app=db.app(label)))
        print("throughput:")
        measure_throughput(db, configs, sizes, repeats)
        by_label = {config.label: config for config in configs}
        results["throughput"] = {
            config.label: {
                "description": config.description,
                "round_seconds": config.rounds,
                "startup_seconds": config.startup,
                "jobs_per_second": config.rates(sizes.jobs),
                "best_jobs_per_second": config.best(sizes.jobs),
                "jobs_left_after_run": config.left_over,
                "client_cpu_us_per_job": [c / sizes.jobs * 1e6 for c in config.client_cpu],
                "server_cpu_us_per_job": [
                    None if c is None else c / sizes.jobs * 1e6 for c in config.server_cpu
                ],
            }
            for config in configs
        }

        def rate_cell(config: Config) -> str:
            rates = config.rates(sizes.jobs)
            cell = f"{max(rates):,.0f} jobs/s"
            if len(rates) > 1:
                cell += f" ({min(rates):,.0f}-{max(rates):,.0f})"
            return cell

        targets = [
            ("ours_default", "node_default", DEFAULTS_TARGET),
            ("ours_default_async", "node_default", DEFAULTS_TARGET),
            ("ours_batched", "node_batched", BATCHED_TARGET),
            ("ours_batched_async", "node_batched", BATCHED_TARGET),
        ]
        for ours_label, node_label, target in targets:
            ours = by_label[ours_label]
            if node_label in by_label:
                theirs = by_label[node_label]
                ratio = ours.best(sizes.jobs) / theirs.best(sizes.jobs)
                results["throughput"][ours_label].update(
                    ratio=ratio, against=node_label, target=target, met=ratio >= target
                )
                table.append(
                    (
                        f"{sizes.jobs:,} jobs: {ours.description}",
                        f"{node_label}: {rate_cell(theirs)}",
                        rate_cell(ours),
                        f"{ratio:.2f}x",
                        f">= {target:.2f}x {verdict(ratio >= target)}",
                    )
                )
            else:
                table.append(
                    (f"{sizes.jobs:,} jobs: {ours.description}", "-", rate_cell(ours), "-", "-")
                )
        # Where the time goes: each side's own CPU and its PostgreSQL backends' per job.
        for config in configs:
            cpu = config.cpu_us(sizes.jobs)
            if cpu is None:
                continue
            client, server = cpu
            table.append(
                (
                    f"CPU per job (best round): {config.label}",
                    f"client {client:.1f} us",
                    "PostgreSQL " + ("n/a" if server is None else f"{server:.1f} us"),
                    "",
                    "(information)",
                )
            )

    finally:
        for process in processes:
            process.close()
    leftovers = {c.label: c.left_over for c in configs if any(c.left_over)}
    if leftovers:
        print(f"  jobs still in the table after a run (not completed): {leftovers}")


def latency(
    db: Database,
    node: str | None,
    sizes: Sizes,
    results: dict[str, Any],
    table: list[tuple[str, str, str, str, str]],
) -> None:
    rounds = sizes.latency_rounds
    print(
        f"\nidle pick-up latency (add_job commit -> handler entry), {rounds} round(s) "
        f"of {sizes.latency_count // rounds} jobs each after {sizes.latency_warmup} "
        "warm-up jobs, in rotating order:",
        flush=True,
    )
    # Short rounds, each side's samples pooled: a machine that slows down for a while
    # slows every side alike instead of whichever ran then.
    per_round = replace(sizes, latency_count=sizes.latency_count // rounds)
    sides: list[tuple[str, Callable[[], Latency]]] = [
        ("ours_default", lambda: ours_latency(db, "lat_ours_def", False, per_round)),
        ("ours_default_async", lambda: ours_latency(db, "lat_ours_async", True, per_round)),
    ]
    if node:
        sides.insert(0, ("node", lambda: node_latency(node, db, per_round)))
    pooled = {label: Latency(label, [], []) for label, _ in sides}
    for round_ in range(rounds):
        shift = round_ % len(sides)
        for label, measure in sides[shift:] + sides[:shift]:
            measured = measure()
            pooled[label].from_commit_ms.extend(measured.from_commit_ms)
            pooled[label].from_call_ms.extend(measured.from_call_ms)
            print(f"  round {round_ + 1}: {label:<20} median {measured.median():.2f} ms")
    latencies = list(pooled.values())
    node_lat = pooled.get("node")
    for lat in latencies:
        print(
            f"  {lat.label:<20} median {lat.median():.2f} ms, p90 {lat.p90():.2f} ms "
            f"(from the add_job call: median {statistics.median(lat.from_call_ms):.2f} ms)",
            flush=True,
        )
    results["latency"] = {
        lat.label: {
            "median_ms": lat.median(),
            "p90_ms": lat.p90(),
            "from_call_median_ms": statistics.median(lat.from_call_ms),
            "from_commit_ms": lat.from_commit_ms,
        }
        for lat in latencies
    }
    for lat in latencies:
        if lat is node_lat:
            continue
        cell = f"median {lat.median():.2f} ms, p90 {lat.p90():.2f} ms"
        if node_lat is not None:
            ratio = lat.median() / node_lat.median()
            ok = ratio <= LATENCY_TARGET
            results["latency"][lat.label].update(ratio=ratio, met=ok)
            table.append(
                (
                    f"latency x{sizes.latency_count}: {lat.label}",
                    f"median {node_lat.median():.2f} ms, p90 {node_lat.p90():.2f} ms",
                    cell,
                    f"{ratio:.2f}x",
                    f"<= {LATENCY_TARGET:.2f}x {verdict(ok)}",
                )
            )
        else:
            table.append((f"latency x{sizes.latency_count}: {lat.label}", "-", cell, "-", "-"))


# -- instrumentation overhead (--otel) ----------------------------------------------------


@dataclass
class Telemetry:
    """OpenTelemetry SDK providers exporting to nowhere, as a real pipeline would, minus I/O."""

    label: str
    description: str
    tracing: bool
    sample_ratio: float
    sample_runs: float = 1.0
    close: list[Callable[[], Any]] = field(default_factory=list)
    spans: list[int] = field(default_factory=lambda: [0])

    def configure(self, db: Database, schema: str) -> Callable[[], Hooks]:
        """The providers, queue gauges on ``schema``, and a maker of instrumented hooks."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            MetricExporter,
            MetricExportResult,
            MetricsData,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from sqla_graphile.otel import instrument, observe_queues

        counted = self.spans

        class DropSpans(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                counted[0] += len(spans)
                return SpanExportResult.SUCCESS

        class DropMetrics(MetricExporter):
            def export(
                self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
            ) -> MetricExportResult:
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
                pass

        meters = MeterProvider(
            metric_readers=[
                PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=1000)
            ]
        )
        tracers = TracerProvider(sampler=ParentBased(TraceIdRatioBased(self.sample_ratio)))
        tracers.add_span_processor(BatchSpanProcessor(DropSpans()))
        gauges = observe_queues(db.engine, schema=schema, meter_provider=meters)
        self.close += [gauges.close, tracers.shutdown, meters.shutdown]
        tracing = self.tracing

        def hooks() -> Hooks:
            made = Hooks()
            instrument(
                made,
                tracer_provider=tracers,
                meter_provider=meters,
                tracing=tracing,
                sample_runs=self.sample_runs,
            )
            return made

        return hooks


TELEMETRY = [
    # The setting docs/observability.md recommends for busy workers: the target's row.
    Telemetry(
        "ours_batched_otel",
        "metrics + tracing, 1 % of jobs recorded one by one (sample_runs=0.01)",
        True,
        1.0,
        0.01,
    ),
    Telemetry(
        "ours_batched_metrics_every",
        "metrics, every duration recorded (sample_runs=1)",
        False,
        1.0,
    ),
    Telemetry(
        "ours_batched_otel_sampler",
        "metrics + tracing, every job, 1 % of spans kept by the SDK's sampler",
        True,
        0.01,
    ),
    Telemetry(
        "ours_batched_otel_every",
        "metrics + tracing, every run recorded (sample_runs=1)",
        True,
        1.0,
    ),
]


def otel_overhead(
    db: Database,
    sizes: Sizes,
    repeats: int,
    results: dict[str, Any],
    table: list[tuple[str, str, str, str, str]],
) -> None:
    """Our batched configuration without and with instrumentation, in rotating rounds."""
    cpu: dict[str, list[float]] = {}

    def with_cpu(label: str, run: Callable[[str], float]) -> Callable[[str], float]:
        """``run``, also noting the CPU seconds this process spent (all its threads)."""
        spent = cpu[label] = []

        def measured(schema: str) -> float:
            before = time.process_time()
            seconds = run(schema)
            spent.append(time.process_time() - before)
            return seconds

        return measured

    off = Config(
        "ours_batched",
        "no instrumentation",
        with_cpu("ours_batched", ours_once(db, noop, OURS_BATCHED)),
    )
    configs = [off]
    try:
        for setup in TELEMETRY:
            schema = db.fresh_schema(setup.label)
            hooks = setup.configure(db, schema)
            configs.append(
                Config(
                    setup.label,
                    setup.description,
                    with_cpu(setup.label, ours_once(db, noop, OURS_BATCHED, hooks)),
                    schema,
                )
            )
        print("instrumentation overhead, our batched configuration (def handler):")
        measure_throughput(db, configs, sizes, repeats)
    finally:
        for setup in TELEMETRY:
            for close in setup.close:
                close()

    def cpu_per_job(label: str) -> float:
        """Microseconds of this process's CPU per job: the best round less the startup."""
        # After the warm-up, each round ran once on an empty queue, then on the jobs.
        spent = cpu[label][1:]
        startup, rounds = min(spent[0::2]), spent[1::2]
        return max(0.0, min(rounds) - startup) / sizes.jobs * 1e6

    base = off.best(sizes.jobs)
    base_cpu = cpu_per_job(off.label)
    results["otel"] = {}
    measured: list[tuple[Config, Telemetry | None]] = [(off, None)]
    measured += zip(configs[1:], TELEMETRY, strict=True)
    for config, telemetry in measured:
        ratio = config.best(sizes.jobs) / base
        entry: dict[str, Any] = {
            "description": config.description,
            "jobs_per_second": config.rates(sizes.jobs),
            "best_jobs_per_second": config.best(sizes.jobs),
            "ratio_to_off": ratio,
            "cpu_microseconds_per_job": cpu_per_job(config.label),
        }
        target = "-"
        if telemetry is not None:
            entry["spans_exported"] = telemetry.spans[0]
        if config.label == "ours_batched_otel":
            entry.update(target=OTEL_TARGET, met=ratio >= OTEL_TARGET)
            target = f">= {OTEL_TARGET:.2f}x {verdict(ratio >= OTEL_TARGET)}"
        results["otel"][config.label] = entry
        rates = config.rates(sizes.jobs)
        cell = f"{max(rates):,.0f} jobs/s"
        if len(rates) > 1:
            cell += f" ({min(rates):,.0f}-{max(rates):,.0f})"
        spans = f", {telemetry.spans[0]:,} spans" if telemetry and telemetry.tracing else ""
        per_job = cpu_per_job(config.label)
        table.append(
            (
                f"{sizes.jobs:,} jobs, batched: {config.description}{spans}",
                cell,
                f"{per_job:.1f} us ({per_job / base_cpu:.2f}x)",
                f"{ratio:.2f}x",
                target,
            )
        )


def main(argv: list[str] | None = None) -> int:
    options = parser(
        (__doc__ or "").split("\n\n")[0],
        quick="fewer jobs, one round",
        repeats="throughput rounds (the best is kept)",
    )
    options.add_argument(
        "--only", choices=("throughput", "latency"), help="run one of the two measurements"
    )
    options.add_argument(
        "--otel",
        action="store_true",
        help="instead, measure the overhead of OpenTelemetry instrumentation on our batched "
        "throughput (needs the otel extra and opentelemetry-sdk)",
    )
    args = options.parse_args(argv)
    url = database_url(args, options)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or sizes.repeats

    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    db = Database(url, engine)
    node = args.node if args.node and NODE_SCRIPT.exists() else None

    environment: dict[str, Any] = {
        **versions(engine, node),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    print("worker benchmark: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    print(
        f"{sizes.jobs:,} no-op jobs at concurrency {CONCURRENCY}, best of {repeats} round(s); "
        "each configuration on its own migrated schema\n"
    )
    if not node and not args.otel:
        print("node not found: only our side is measured, no ratios\n")

    results: dict[str, Any] = {}
    table: list[tuple[str, str, str, str, str]] = []
    try:
        if args.otel:
            otel_overhead(db, sizes, repeats, results, table)
        else:
            if args.only in (None, "throughput"):
                throughput(db, node, sizes, repeats, environment, results, table)
            if args.only in (None, "latency"):
                latency(db, node, sizes, results, table)
    finally:
        db.drop_schemas()
        engine.dispose()

    environment["load_after"] = [round(x, 2) for x in os.getloadavg()]
    header = ("measurement", "node", "ours", "ratio", "target")
    if args.otel:
        header = ("measurement", "throughput", "CPU per job", "vs none", "target")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    print()
    for row in [header, *table]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    print(f"\nload average before {environment['load_before']}, after {environment['load_after']}")

    if args.json:
        document = {"environment": environment, "sizes": vars(sizes), "results": results}
        document["sizes"] = {**sizes.__dict__, "repeats": repeats}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
