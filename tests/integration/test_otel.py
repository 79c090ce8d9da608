"""OpenTelemetry tracing and metrics, queue gauges and the Prometheus endpoint.

Everything runs a real ``Worker`` on a real PostgreSQL; spans and metric points are read
with the OpenTelemetry SDK's in-memory span exporter and metric reader.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from worker_fixtures import await_for, execute, fetch_session, running

from sqla_graphile import (
    AsyncWorkerUtils,
    Fail,
    Hooks,
    InvalidArgument,
    InvalidArgumentType,
    Job,
    JobAddContext,
    JobScheduleFailed,
    JobScheduleSkipped,
    JobsFetchedEvent,
    JobSpec,
    JobsWrittenEvent,
    RawJobSpec,
    Skip,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile._urls import async_engine_from_url
from sqla_graphile.otel import TRACE_CONTEXT_KEY, instrument, observe_queues
from sqla_graphile.prometheus import serve_prometheus
from sqla_graphile.schema import quote_schema


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader
    meter_provider: MeterProvider

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:  # nothing at all to report
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found

    def value(self, metric: str, **attributes: Any) -> float:
        """The one number point of ``metric`` with exactly these attributes."""
        matching = [p for p in self.points(metric) if dict(p.attributes) == attributes]
        assert len(matching) == 1, (metric, attributes, self.points(metric))
        point = matching[0]
        assert isinstance(point, NumberDataPoint)
        return point.value


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(spans, tracer_provider, reader, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _instrumented(telemetry: Telemetry, **options: Any) -> Hooks:
    hooks = Hooks()
    instrument(
        hooks,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        **options,
    )
    return hooks


def _stored_payloads(engine: Engine, schema: str) -> list[Any]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"select payload from {quote_schema(schema)}._private_jobs order by id")
        )
        return [row[0] for row in rows]


# -- tracing: adding ---------------------------------------------------------------------


def test_add_spans_are_children_of_the_callers_span(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry)
    utils = WorkerUtils(engine, schema, hooks=hooks)
    tracer = telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        job = utils.add_raw_job("mail", {"to": "a"}, JobSpec(queue_name="outbox"))
        jobs = utils.add_raw_jobs([RawJobSpec("mail", {"n": 1}), RawJobSpec("sms", {"n": 2})])

    parent = request.get_span_context()
    (single,) = telemetry.named("add_raw_job mail")
    assert single.kind == SpanKind.PRODUCER
    assert single.parent is not None and single.parent.span_id == parent.span_id
    assert single.context.trace_id == parent.trace_id
    assert single.attributes is not None
    assert single.attributes["graphile_worker.job.id"] == job.id
    assert single.attributes["graphile_worker.job.task_identifier"] == "mail"
    assert single.attributes["graphile_worker.job.queue_name"] == "outbox"
    assert single.attributes["messaging.system"] == "graphile_worker"
    (batch,) = telemetry.named("add_raw_jobs")  # two tasks: no task in the name
    assert batch.parent is not None and batch.parent.span_id == parent.span_id
    assert batch.attributes is not None
    assert batch.attributes["graphile_worker.job.count"] == len(jobs) == 2
    # By default nothing is added to what is stored: Node handlers see the same payloads.
    assert _stored_payloads(engine, schema) == [{"to": "a"}, {"n": 1}, {"n": 2}]
    assert telemetry.value("graphile_worker.jobs.added", task="mail", queue="outbox") == 1
    assert telemetry.value("graphile_worker.jobs.added", task="mail", queue="") == 1
    assert telemetry.value("graphile_worker.jobs.added", task="sms", queue="") == 1


def test_a_refused_add_ends_its_span_as_an_error(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry)
    hooks.before_job_schedule(lambda ctx: Fail("not today"))
    utils = WorkerUtils(engine, schema, hooks=hooks)
    with pytest.raises(JobScheduleFailed):
        utils.add_raw_job("mail", {})
    (span,) = telemetry.named("add_raw_job")
    assert span.status.status_code == StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    assert _stored_payloads(engine, schema) == []


async def test_async_utils_add_spans_follow_the_callers_task(
    database_url: str, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry)
    engine = async_engine_from_url(database_url)
    tracer = telemetry.tracer_provider.get_tracer("app")
    try:
        utils = AsyncWorkerUtils(engine, schema, hooks=hooks)
        with tracer.start_as_current_span("request") as request:
            job = await utils.add_raw_job("mail", {"to": "a"})
    finally:
        await engine.dispose()
    (span,) = telemetry.named("add_raw_job mail")
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.attributes is not None and span.attributes["graphile_worker.job.id"] == job.id


# -- tracing: running --------------------------------------------------------------------


def test_run_spans_carry_the_job_and_its_outcome(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = Hooks()
    instrumentation = instrument(
        hooks, tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    )
    tracer = telemetry.tracer_provider.get_tracer("handlers")

    @task("sync_job")
    def sync_job(payload: Any, ctx: WorkerContext) -> None:
        with tracer.start_as_current_span("inside sync"):
            if payload.get("fail"):
                raise ValueError("no luck")

    @task("async_job")
    async def async_job(payload: Any, ctx: WorkerContext) -> None:
        with tracer.start_as_current_span("inside async"):
            await asyncio.sleep(0)

    utils = WorkerUtils(engine, schema, hooks=hooks)
    ok = utils.add_raw_job("sync_job", {}, JobSpec(queue_name="q"))
    retried = utils.add_raw_job("sync_job", {"fail": True}, JobSpec(max_attempts=3))
    final = utils.add_raw_job("sync_job", {"fail": True}, JobSpec(max_attempts=1))
    awaited = utils.add_raw_job("async_job", {})
    Worker(engine, [sync_job, async_job], schema=schema, hooks=hooks).run_once()
    # Outcomes are recorded as they are written: every run span is ended.
    assert instrumentation.open_spans == 0

    runs = {
        span.attributes["graphile_worker.job.id"]: span
        for span in telemetry.finished()
        if span.kind == SpanKind.CONSUMER and span.attributes is not None
    }
    assert set(runs) == {ok.id, retried.id, final.id, awaited.id}
    expected = {
        ok.id: ("completed", "q"),
        retried.id: ("retried", None),
        final.id: ("permanently_failed", None),
        awaited.id: ("completed", None),
    }
    for job_id, (outcome, queue) in expected.items():
        span = runs[job_id]
        attributes = span.attributes
        assert attributes is not None
        assert span.parent is None  # a trace of its own
        assert list(span.links) == []  # nothing carried: no link
        assert attributes["graphile_worker.job.attempt"] == 1
        assert attributes["graphile_worker.job.outcome"] == outcome
        assert attributes.get("graphile_worker.job.queue_name") == queue
    assert runs[ok.id].name == "run sync_job"
    assert runs[ok.id].status.status_code == StatusCode.UNSET
    failed = runs[final.id]
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "ValueError: no luck"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes is not None and event.attributes["exception.message"] == "no luck"
    # The run span is current inside the handler, in its thread or in its task.
    for name, job in (("inside sync", ok), ("inside async", awaited)):
        run = runs[job.id].context
        inside = [s for s in telemetry.named(name) if s.context.trace_id == run.trace_id]
        assert len(inside) == 1
        assert inside[0].parent is not None
        assert inside[0].parent.span_id == run.span_id


def test_a_lost_lock_ends_the_run_span_as_such(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry)

    @task("stolen")
    def stolen(payload: Any, ctx: WorkerContext) -> None:
        with engine.begin() as connection:
            connection.execute(
                text(
                    f"update {quote_schema(schema)}._private_jobs "
                    "set locked_by = 'someone_else' where id = :id"
                ),
                {"id": ctx.job.id},
            )

    utils = WorkerUtils(engine, schema, hooks=hooks)
    job = utils.add_raw_job("stolen", {})
    Worker(engine, [stolen], schema=schema, hooks=hooks).run_once()
    (span,) = telemetry.named("run stolen")
    assert span.attributes is not None
    assert span.attributes["graphile_worker.job.id"] == job.id
    assert span.attributes["graphile_worker.job.outcome"] == "lock_lost"
    assert telemetry.value("graphile_worker.jobs.lock_lost", task="stolen", queue="") == 1
    assert telemetry.points("graphile_worker.jobs.completed") == []


def test_carried_trace_context_links_the_run_and_never_reaches_the_handler(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry, carry_trace_context=True)
    seen: list[Any] = []

    @dataclass
    class Greet(TaskHandler):
        IDENTIFIER = "greet"
        name: str

        def run(self, ctx: WorkerContext) -> None:
            seen.append(self)

    @task("raw")
    def raw(payload: Any, ctx: WorkerContext) -> None:
        seen.append(payload)

    utils = WorkerUtils(engine, schema, hooks=hooks)
    tracer = telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request"):
        typed = utils.add_job(Greet("Ada"))
        untyped = utils.add_raw_job("raw", {"x": 1})
        batch = utils.add_raw_jobs([RawJobSpec("raw", {"x": 2}), RawJobSpec("raw", [3])])
    stored = _stored_payloads(engine, schema)
    # Opted in: the adding span's W3C context is stored beside the payload's own keys.
    for payload, add_span in zip(
        stored[:3],
        ["add_job greet", "add_raw_job raw", "add_raw_jobs raw"],
        strict=True,
    ):
        (span,) = telemetry.named(add_span)
        carried = payload[TRACE_CONTEXT_KEY]
        assert carried["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    assert stored[3] == [3]  # only JSON objects carry it

    Worker(engine, [Greet, raw], schema=schema, hooks=hooks).run_once()

    assert sorted(map(repr, seen)) == sorted(map(repr, [Greet("Ada"), {"x": 1}, {"x": 2}, [3]]))
    runs = {
        span.attributes["graphile_worker.job.id"]: span
        for span in telemetry.finished()
        if span.kind == SpanKind.CONSUMER and span.attributes is not None
    }
    for job, add_span in (
        (typed, "add_job greet"),
        (untyped, "add_raw_job raw"),
        (batch[0], "add_raw_jobs raw"),
    ):
        (span,) = telemetry.named(add_span)
        (link,) = runs[job.id].links
        assert link.context.span_id == span.context.span_id
        assert link.context.trace_id == span.context.trace_id
        assert runs[job.id].parent is None
    assert list(runs[batch[1].id].links) == []
    assert all(
        span.attributes["graphile_worker.job.outcome"] == "completed" for span in runs.values()
    )


# -- metrics ------------------------------------------------------------------------------


def test_job_counters_duration_and_batch_sizes(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry, tracing=False)

    @task("work")
    def work(payload: Any, ctx: WorkerContext) -> None:
        if payload.get("fail"):
            raise RuntimeError("failing on purpose")

    utils = WorkerUtils(engine, schema, hooks=hooks)
    utils.add_raw_jobs([RawJobSpec("work", {}, JobSpec(queue_name="q1")) for _ in range(3)])
    utils.add_raw_job("work", {"fail": True}, JobSpec(max_attempts=2))
    utils.add_raw_job("work", {"fail": True}, JobSpec(max_attempts=1))
    Worker(engine, [work], schema=schema, hooks=hooks, concurrency=2).run_once()

    value = telemetry.value
    assert value("graphile_worker.jobs.added", task="work", queue="q1") == 3
    assert value("graphile_worker.jobs.started", task="work", queue="q1") == 3
    assert value("graphile_worker.jobs.started", task="work", queue="") == 2
    assert value("graphile_worker.jobs.completed", task="work", queue="q1") == 3
    assert value("graphile_worker.jobs.failed", task="work", queue="") == 2
    assert value("graphile_worker.jobs.retried", task="work", queue="") == 1
    assert value("graphile_worker.jobs.permanently_failed", task="work", queue="") == 1
    durations = {
        point.attributes["outcome"]: point
        for point in telemetry.points("graphile_worker.job.duration")
    }
    assert set(durations) == {"completed", "retried", "permanently_failed"}
    assert durations["completed"].count == 3
    assert dict(durations["completed"].attributes) == {
        "task": "work",
        "queue": "q1",
        "outcome": "completed",
    }
    assert durations["retried"].count == durations["permanently_failed"].count == 1
    assert all(isinstance(p, HistogramDataPoint) and p.sum >= 0 for p in durations.values())
    # Every job was locked by some fetch, and every outcome written by some statement.
    (fetched,) = telemetry.points("graphile_worker.fetch.size")
    assert fetched.sum == 5 and fetched.count >= 1
    written = {p.attributes["outcome"]: p for p in telemetry.points("graphile_worker.write.size")}
    assert written["complete"].sum == 3 and written["fail"].sum == 2


def test_job_metrics_without_queues(engine: Engine, schema: str, telemetry: Telemetry) -> None:
    hooks = _instrumented(telemetry, tracing=False, by_queue=False)

    @task("work")
    def work(payload: Any, ctx: WorkerContext) -> None:
        pass

    utils = WorkerUtils(engine, schema, hooks=hooks)
    utils.add_raw_job("work", {}, JobSpec(queue_name="a"))
    utils.add_raw_job("work", {}, JobSpec(queue_name="b"))
    Worker(engine, [work], schema=schema, hooks=hooks).run_once()
    assert telemetry.value("graphile_worker.jobs.completed", task="work") == 2
    assert telemetry.finished() == []  # tracing off


def test_sample_runs_records_every_attempt_of_the_chosen_jobs_and_counts_all(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry, sample_runs=0.5)

    @task("flaky")
    def flaky(payload: Any, ctx: WorkerContext) -> None:
        if ctx.job.attempts == 1:
            raise RuntimeError("first attempt fails")

    utils = WorkerUtils(engine, schema, hooks=hooks)
    jobs = utils.add_raw_jobs([RawJobSpec("flaky", {}, JobSpec(max_attempts=2)) for _ in range(40)])
    worker = Worker(engine, [flaky], schema=schema, hooks=hooks, concurrency=4)
    worker.run_once()  # every first attempt fails
    execute(engine, f"update {quote_schema(schema)}._private_jobs set run_at = now()")
    worker.run_once()  # every second attempt completes

    attempts: dict[int, list[str]] = {}
    for span in telemetry.finished():
        if span.kind == SpanKind.CONSUMER and span.attributes is not None:
            job_id = span.attributes["graphile_worker.job.id"]
            attempts.setdefault(job_id, []).append(span.attributes["graphile_worker.job.outcome"])
    # About half the jobs are chosen (by id), and each chosen job has both its runs.
    assert 0 < len(attempts) < len(jobs)
    assert set(attempts) <= {job.id for job in jobs}
    assert all(sorted(runs) == ["completed", "retried"] for runs in attempts.values())
    # The durations are of the chosen runs; the counters count every job.
    durations = {
        point.attributes["outcome"]: point.count
        for point in telemetry.points("graphile_worker.job.duration")
    }
    assert durations == {"retried": len(attempts), "completed": len(attempts)}
    assert telemetry.value("graphile_worker.jobs.started", task="flaky", queue="") == 80
    assert telemetry.value("graphile_worker.jobs.retried", task="flaky", queue="") == 40
    assert telemetry.value("graphile_worker.jobs.completed", task="flaky", queue="") == 40


def test_sample_runs_zero_records_no_run_and_bad_shares_are_refused(
    engine: Engine, schema: str, telemetry: Telemetry
) -> None:
    hooks = _instrumented(telemetry, sample_runs=0)

    @task("work")
    def work(payload: Any, ctx: WorkerContext) -> None:
        pass

    utils = WorkerUtils(engine, schema, hooks=hooks)
    utils.add_raw_jobs([RawJobSpec("work", {}) for _ in range(5)])
    Worker(engine, [work], schema=schema, hooks=hooks).run_once()
    assert [span.kind for span in telemetry.finished()] == [SpanKind.PRODUCER]  # the add
    assert telemetry.points("graphile_worker.job.duration") == []
    assert telemetry.value("graphile_worker.jobs.completed", task="work", queue="") == 5
    for share in (-0.1, 1.5):
        with pytest.raises(InvalidArgument, match="sample_runs"):
            instrument(Hooks(), sample_runs=share)
    with pytest.raises(InvalidArgumentType, match="sample_runs"):
        instrument(Hooks(), sample_runs="0.5")  # type: ignore[arg-type]


def _gauges(telemetry: Telemetry, metric: str) -> dict[tuple[Any, ...], float]:
    return {
        tuple(sorted(point.attributes.items())): point.value for point in telemetry.points(metric)
    }


def test_queue_gauges_from_one_query(engine: Engine, schema: str, telemetry: Telemetry) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_jobs(
        [
            RawJobSpec("mail", {}, JobSpec(queue_name="q")),
            RawJobSpec("mail", {}),
            RawJobSpec("mail", {}, JobSpec(run_at=_in_an_hour(engine))),
        ]
    )
    locked = utils.add_raw_job("report", {})
    failed = utils.add_raw_job("report", {})
    utils.permanently_fail_jobs([failed.id], "gave up")
    q = quote_schema(schema)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"update {q}._private_jobs set run_at = now() - interval '90 seconds' "
                "where job_queue_id is not null"
            )
        )
        connection.execute(
            text(
                f"update {q}._private_jobs set locked_by = 'w', "
                "locked_at = now() - interval '120 seconds' where id = :id"
            ),
            {"id": locked.id},
        )

    observer = observe_queues(
        engine, schema=schema, meter_provider=telemetry.meter_provider, interval=3600
    )
    jobs = _gauges(telemetry, "graphile_worker.queue.jobs")

    def state(task: str, queue: str, name: str) -> float:
        return jobs[(("queue", queue), ("state", name), ("task", task))]

    assert state("mail", "q", "runnable") == 1
    assert state("mail", "", "runnable") == 1
    assert state("mail", "", "scheduled") == 1
    assert state("report", "", "locked") == 1
    assert state("report", "", "permanently_failed") == 1
    assert state("report", "", "runnable") == 0
    assert len(jobs) == 3 * 4  # three task/queue groups, four states each
    ages = _gauges(telemetry, "graphile_worker.queue.oldest_runnable_age")
    assert 90 <= ages[(("queue", "q"), ("task", "mail"))] < 3600
    assert ages[(("queue", ""), ("task", "report"))] == 0
    locks = _gauges(telemetry, "graphile_worker.queue.oldest_lock_age")
    assert 120 <= locks[(("queue", ""), ("task", "report"))] < 3600
    assert locks[(("queue", ""), ("task", "mail"))] == 0
    # One query served the three gauges, and the next collection within the interval.
    _gauges(telemetry, "graphile_worker.queue.jobs")
    assert observer.queries == 1

    # Groups seen once report zeros when their jobs are gone.
    with engine.begin() as connection:
        connection.execute(text(f"delete from {q}._private_jobs"))
    assert len(observer.sample()) == 3  # read now; the gauges report it
    jobs = _gauges(telemetry, "graphile_worker.queue.jobs")
    assert len(jobs) == 12 and set(jobs.values()) == {0}
    assert observer.queries == 2
    with pytest.raises(InvalidArgument):
        observe_queues(engine, schema=schema, meter_provider=telemetry.meter_provider)
    observer.close()
    assert telemetry.points("graphile_worker.queue.jobs") == []
    # A closed observer's place can be taken (its gauges stay registered).
    again = observe_queues(
        engine,
        schema=schema,
        meter_provider=telemetry.meter_provider,
        interval=3600,
        by_queue=False,
    )
    utils.add_raw_job("mail", {}, JobSpec(queue_name="q"))
    jobs = _gauges(telemetry, "graphile_worker.queue.jobs")
    assert jobs[(("state", "runnable"), ("task", "mail"))] == 1
    again.close()


def _in_an_hour(engine: Engine) -> Any:
    with engine.connect() as connection:
        return connection.scalar(text("select now() + interval '1 hour'"))


def test_queue_gauges_of_a_worker_and_a_failing_query(
    engine: Engine, schema: str, telemetry: Telemetry, caplog: pytest.LogCaptureFixture
) -> None:
    @task("mail")
    def mail(payload: Any, ctx: WorkerContext) -> None:
        pass

    worker = Worker(engine, [mail], schema=schema)
    WorkerUtils(engine, schema).add_raw_job("mail", {})
    observer = observe_queues(worker, meter_provider=telemetry.meter_provider, interval=3600)
    assert observer.schema == schema
    jobs = _gauges(telemetry, "graphile_worker.queue.jobs")
    assert jobs[(("queue", ""), ("state", "runnable"), ("task", "mail"))] == 1
    worker.run_once()
    observer.sample()
    jobs = _gauges(telemetry, "graphile_worker.queue.jobs")
    assert jobs[(("queue", ""), ("state", "runnable"), ("task", "mail"))] == 0
    observer.close()

    with engine.begin() as connection:
        connection.execute(text(f"drop schema {quote_schema(schema)} cascade"))
    broken = observe_queues(engine, schema=schema, meter_provider=telemetry.meter_provider)
    assert telemetry.points("graphile_worker.queue.jobs") == []
    assert telemetry.points("graphile_worker.queue.oldest_lock_age") == []
    assert caplog.text.count("reading the queue gauges failed") == 1  # once per collection
    assert broken.queries == 0
    broken.close()


# -- the Prometheus endpoint -------------------------------------------------------------


def test_the_prometheus_endpoint_serves_job_and_queue_metrics(engine: Engine, schema: str) -> None:
    endpoint = serve_prometheus(0)
    try:
        hooks = Hooks()
        instrument(hooks, meter_provider=endpoint.meter_provider, tracing=False)
        observer = observe_queues(engine, schema=schema, meter_provider=endpoint.meter_provider)

        @task("mail")
        def mail(payload: Any, ctx: WorkerContext) -> None:
            if payload.get("fail"):
                raise ValueError("bounced")

        utils = WorkerUtils(engine, schema, hooks=hooks)
        utils.add_raw_jobs([RawJobSpec("mail", {}, JobSpec(queue_name="q"))] * 2)
        utils.add_raw_job("mail", {"fail": True}, JobSpec(max_attempts=1))
        utils.add_raw_job("mail", {}, JobSpec(run_at=_in_an_hour(engine)))
        observer.sample()  # the queue "q" is seen with its jobs
        Worker(engine, [mail], schema=schema, hooks=hooks).run_once()
        observer.sample()  # and read again now: the scrape reports this sample

        with urllib.request.urlopen(endpoint.url, timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
        samples = [
            (sample.name, _without_scope(sample.labels), sample.value)
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        ]

        def sample(name: str, **labels: str) -> float:
            (value,) = [v for n, ls, v in samples if n == name and ls == labels]
            return value

        assert sample("graphile_worker_jobs_completed_total", task="mail", queue="q") == 2
        assert sample("graphile_worker_jobs_started_total", task="mail", queue="") == 1
        assert sample("graphile_worker_jobs_permanently_failed_total", task="mail", queue="") == 1
        assert (
            sample(
                "graphile_worker_job_duration_seconds_count",
                task="mail",
                queue="q",
                outcome="completed",
            )
            == 2
        )
        assert sample("graphile_worker_fetch_size_sum") == 3
        assert sample("graphile_worker_queue_jobs", task="mail", queue="", state="scheduled") == 1
        assert (
            sample("graphile_worker_queue_jobs", task="mail", queue="", state="permanently_failed")
            == 1
        )
        assert sample("graphile_worker_queue_jobs", task="mail", queue="q", state="runnable") == 0
        assert "process_cpu_seconds_total" in body or "python_info" in body
        observer.close()
    finally:
        endpoint.close()
    with pytest.raises(OSError), urllib.request.urlopen(endpoint.url, timeout=5):
        pass


def _without_scope(labels: dict[str, str]) -> dict[str, str]:
    """The labels of a sample less the exporter's instrumentation-scope ones."""
    return {key: value for key, value in labels.items() if not key.startswith("otel_scope")}


def test_serve_prometheus_refuses_a_bad_port() -> None:
    with pytest.raises(InvalidArgument):
        serve_prometheus(70000)


# -- opting in -----------------------------------------------------------------------------


def test_instrument_takes_hooks_workers_and_utils_once(engine: Engine, schema: str) -> None:
    @task("noop")
    def noop(payload: Any, ctx: WorkerContext) -> None:
        pass

    worker = Worker(engine, [noop], schema=schema)
    instrumentation = instrument(worker)
    assert instrumentation.hooks is worker.hooks
    assert instrumentation.tracing and instrumentation.metrics
    with pytest.raises(InvalidArgument, match="already instrumented"):
        instrument(worker.hooks)
    utils = WorkerUtils(engine, schema, hooks=Hooks())
    assert instrument(utils, metrics=False).hooks is utils.hooks
    with pytest.raises(InvalidArgument, match="hooks=Hooks"):
        instrument(WorkerUtils(engine, schema))
    with pytest.raises(InvalidArgumentType):
        instrument("hooks")
    with pytest.raises(InvalidArgumentType):
        observe_queues(42)
    with pytest.raises(InvalidArgument):
        observe_queues(engine, interval=0.5)


_SUBPROCESS = """
import json, sys
{block}
import sqla_graphile
from sqla_graphile import Worker, WorkerUtils, task

@task("noop")
def noop(payload, ctx):
    pass

WorkerUtils(sys.argv[1], sys.argv[2]).add_raw_job("noop", {{}})
worker = Worker(sys.argv[1], [noop], schema=sys.argv[2])
worker.run_once()
worker.close()
extras = {{"opentelemetry", "prometheus_client"}}
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & extras)
try:
    import sqla_graphile.otel
    otel = "imported"
except ImportError as exc:
    otel = str(exc)
print(json.dumps({{"loaded": loaded, "otel": otel}}))
"""

# Makes the extras' packages unimportable, as in an installation without them.
_BLOCK = """
import importlib.abc
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("opentelemetry", "prometheus_client"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.parametrize("extras", ["installed", "absent"])
def test_nothing_of_opentelemetry_is_imported_unless_asked(
    database_url: str, engine: Engine, schema: str, extras: str
) -> None:
    script = _SUBPROCESS.format(block=_BLOCK if extras == "absent" else "")
    result = subprocess.run(
        [sys.executable, "-c", script, database_url, schema],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The worker ran its job without loading any of it.
    assert report["loaded"] == []
    assert _stored_payloads(engine, schema) == []
    if extras == "absent":
        assert "pip install 'sqla-graphile[otel]'" in report["otel"]
    else:
        assert report["otel"] == "imported"


# -- the hook points the instrumentation uses -------------------------------------------


def test_job_run_context_wraps_each_handler_where_it_runs(engine: Engine, schema: str) -> None:
    current: contextvars.ContextVar[int | None] = contextvars.ContextVar("current", default=None)
    seen: dict[str, tuple[int | None, str]] = {}
    order: list[str] = []
    hooks = Hooks()

    @hooks.job_run_context
    @contextmanager
    def scope(job: Job) -> Iterator[None]:
        order.append(f"enter {job.task_identifier}")
        token = current.set(job.id)
        try:
            yield
        finally:
            current.reset(token)
            order.append(f"exit {job.task_identifier}")

    @hooks.job_run_context
    def second(job: Job) -> AbstractContextManager[None]:
        order.append("second")
        return nullcontext()

    @task("threaded")
    def threaded(payload: Any, ctx: WorkerContext) -> None:
        seen["threaded"] = (current.get(), threading.current_thread().name)

    @task("awaited")
    async def awaited(payload: Any, ctx: WorkerContext) -> None:
        seen["awaited"] = (current.get(), threading.current_thread().name)

    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("threaded", {})
    other = utils.add_raw_job("awaited", {})
    Worker(engine, [threaded, awaited], schema=schema, hooks=hooks, concurrency=1).run_once()
    assert seen["threaded"][0] == first.id
    assert seen["threaded"][1].startswith("sqla_graphile-handler")
    assert seen["awaited"][0] == other.id
    assert not seen["awaited"][1].startswith("sqla_graphile-handler")
    assert order == [
        "second",
        "enter threaded",
        "exit threaded",
        "second",
        "enter awaited",
        "exit awaited",
    ]


def test_job_add_context_sees_the_jobs_added_and_the_error(engine: Engine, schema: str) -> None:
    hooks = Hooks()
    calls: list[tuple[str, list[int], str | None]] = []

    @hooks.job_add_context
    @contextmanager
    def adding(ctx: JobAddContext) -> Iterator[None]:
        assert ctx.schema == schema and ctx.jobs == []
        try:
            yield
        except Exception as exc:
            calls.append((ctx.operation, [j.id for j in ctx.jobs], type(exc).__name__))
            raise
        calls.append((ctx.operation, [j.id for j in ctx.jobs], None))

    hooks.before_job_schedule(lambda ctx: Skip() if ctx.identifier == "skipped" else None)
    utils = WorkerUtils(engine, schema, hooks=hooks)
    one = utils.add_raw_job("a", {})
    many = utils.add_raw_jobs([RawJobSpec("a", {}), RawJobSpec("b", {})])
    with pytest.raises(JobScheduleSkipped):
        utils.add_raw_job("skipped", {})
    assert calls == [
        ("add_raw_job", [one.id], None),
        ("add_raw_jobs", [job.id for job in many], None),
        ("add_raw_job", [], "JobScheduleSkipped"),
    ]


def test_batch_events_report_fetches_and_writes(engine: Engine, schema: str) -> None:
    hooks = Hooks()
    fetched: list[JobsFetchedEvent] = []
    written: list[JobsWrittenEvent] = []
    hooks.on("jobs_fetched")(fetched.append)

    @hooks.on("jobs_written")
    async def on_written(event: JobsWrittenEvent) -> None:
        written.append(event)

    @task("work")
    def work(payload: Any, ctx: WorkerContext) -> None:
        if payload.get("fail"):
            raise ValueError("no")

    utils = WorkerUtils(engine, schema)
    jobs = utils.add_raw_jobs([RawJobSpec("work", {}) for _ in range(4)])
    jobs.append(utils.add_raw_job("work", {"fail": True}))
    worker = Worker(engine, [work], schema=schema, hooks=hooks)
    worker.run_once()
    assert sorted(job.id for event in fetched for job in event.jobs) == [job.id for job in jobs]
    assert all(event.worker_id == worker.worker_id and event.jobs for event in fetched)
    sizes: dict[str, int] = {}
    for event in written:
        sizes[event.outcome] = sizes.get(event.outcome, 0) + event.size
    assert sizes == {"complete": 4, "fail": 1}


async def test_a_quick_fetch_reports_its_jobs_too(engine: Engine, schema: str) -> None:
    hooks = Hooks()
    seen: list[int] = []

    @hooks.on("jobs_fetched")
    async def fetched(event: JobsFetchedEvent) -> None:  # run as a task of its own
        seen.extend(job.id for job in event.jobs)

    started, release = asyncio.Event(), asyncio.Event()

    @task("quick")
    async def quick(payload: Any, ctx: WorkerContext) -> None:
        started.set()
        await release.wait()  # no fetch after it until the check below

    worker = Worker(engine, [quick], schema=schema, poll_interval=600, hooks=hooks)
    async with running(worker):
        pid = await await_for(lambda: fetch_session(worker), what="an idle fetcher")
        (before,) = execute(engine, "select clock_timestamp() as at")
        job = WorkerUtils(engine, schema).add_raw_job("quick", {})
        await await_for(started.is_set, what="the handler")
        # The idle worker locked it with the prepared statement of its quick fetch.
        (activity,) = execute(
            engine, "select query, query_start from pg_stat_activity where pid = :pid", pid=pid
        )
        assert activity["query"].startswith("PREPARE sqla_graphile_fetch_")
        assert activity["query_start"] > before["at"]
        await await_for(lambda: seen == [job.id], what="the jobs_fetched event")
        release.set()
    worker.close()
