"""OpenTelemetry traces and metrics for sqla-graphile (install the ``otel`` extra).

Nothing here is imported by ``sqla_graphile`` itself: instrumentation is opt-in, by one
explicit call on the :class:`~sqla_graphile.hooks.Hooks` the worker and the utils share::

    from sqla_graphile.otel import instrument, observe_queues

    hooks = Hooks()
    instrument(hooks)                  # spans and job metrics, on the global providers
    worker = Worker(engine, tasks, hooks=hooks)
    utils = WorkerUtils(engine, hooks=hooks)
    observe_queues(engine)             # queue depth and age gauges, one query per interval

Tracing: a ``PRODUCER`` span for each ``add_job`` / ``add_jobs`` / … call, in the caller's
current trace, and a ``CONSUMER`` span for each job run, current while the handler runs
(so the handler's own spans are its children). A run span starts a trace of its own; it
is *linked* to the span that added the job only when the job carries that span's W3C
trace context, which is opt-in (``carry_trace_context=True``), because the context then
travels in the job's payload under :data:`TRACE_CONTEXT_KEY` (Node handlers would see
that key). Without it, a run span and its add span share the job id attribute.

Metrics: counters ``graphile_worker.jobs.added``, ``.started``, ``.completed``,
``.failed`` (every failed attempt), ``.retried`` and ``.permanently_failed`` (the two
kinds of failed attempt) and ``.lock_lost``; histograms ``graphile_worker.job.duration``
(seconds, with an ``outcome`` attribute), ``graphile_worker.fetch.size`` and
``graphile_worker.write.size`` (jobs per fetch statement, outcomes per write statement).
Job metrics carry the attributes ``task`` and ``queue`` (``""`` for jobs without a named
queue; left out with ``by_queue=False``). :func:`observe_queues` adds gauges read from
the database (see there).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeAlias

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace import TracerProvider as TracerProviderType
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "sqla_graphile.otel needs the OpenTelemetry API: pip install 'sqla-graphile[otel]'"
    ) from exc

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from ._queue_metrics import QueueSample, read_queue_samples
from ._urls import engine_from_url, normalize_url
from ._version import __version__
from .errors import InvalidArgument, InvalidArgumentType
from .hooks import (
    BeforeJobRunContext,
    BeforeJobScheduleContext,
    Continue,
    Hooks,
    JobAddContext,
    JobCompleteEvent,
    JobFailEvent,
    JobLockLostEvent,
    JobsFetchedEvent,
    JobsWrittenEvent,
    WorkerFenceEvent,
    WorkerStopEvent,
)
from .job import Job
from .schema import DEFAULT_SCHEMA, validate_schema_name

__all__ = [
    "DURATION_BUCKETS",
    "MIN_QUEUE_INTERVAL",
    "SIZE_BUCKETS",
    "TRACE_CONTEXT_KEY",
    "Instrumentation",
    "QueueObserver",
    "QueueSample",
    "instrument",
    "observe_queues",
]

logger = logging.getLogger("sqla_graphile.otel")

#: The payload key under which ``carry_trace_context=True`` stores the W3C trace context
#: (``{"traceparent": ..., "tracestate": ...}``) of the span that added a job. Only
#: JSON-object payloads carry it; the worker removes it before the handler sees them.
TRACE_CONTEXT_KEY = "__trace_context"

#: Bucket boundaries (seconds) of ``graphile_worker.job.duration``.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: The shortest interval between two queries of :func:`observe_queues` (seconds).
MIN_QUEUE_INTERVAL = 1.0

#: Bucket boundaries of the fetch and write batch-size histograms.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

_NAME = "sqla_graphile"
_SYSTEM = "graphile_worker"
_PROPAGATOR = TraceContextTextMapPropagator()
# Run spans start traces of their own, whatever happens to be current in the worker.
_ROOT = otel_context.Context()

_A_JOB_ID = "graphile_worker.job.id"
_A_TASK = "graphile_worker.job.task_identifier"
_A_QUEUE = "graphile_worker.job.queue_name"
_A_ATTEMPT = "graphile_worker.job.attempt"
_A_OUTCOME = "graphile_worker.job.outcome"
_A_COUNT = "graphile_worker.job.count"

_COUNTERS = {
    "added": "Jobs added through instrumented utils",
    "started": "Job handlers started",
    "completed": "Jobs completed",
    "failed": "Failed job attempts (retried and permanently failed)",
    "retried": "Failed job attempts that will be tried again",
    "permanently_failed": "Failed job attempts that were the job's last",
    "lock_lost": "Job outcomes not written because the job's lock was no longer held",
}

_Key: TypeAlias = tuple[str, "str | None"]
_Attributes: TypeAlias = dict[str, Any]

_instrumented: weakref.WeakSet[Hooks] = weakref.WeakSet()
# How long a worker's stop waits for the telemetry of its last jobs.
_FLUSH_TIMEOUT = 10.0


# -- metrics shared by every instrumentation on one meter provider ------------------------


class _JobMetrics:
    """The job instruments of one meter provider.

    Counters are observable: events add to plain totals (cheap enough to count every
    job of a busy worker) and the totals are reported at each collection.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, dict[_Key, int]] = {name: {} for name in _COUNTERS}
        self._attributes: dict[tuple[str, str | None, str | None], _Attributes] = {}
        for name, description in _COUNTERS.items():
            meter.create_observable_counter(
                f"graphile_worker.jobs.{name}",
                callbacks=[functools.partial(self._observe, name)],
                unit="{job}",
                description=description,
            )
        self.duration = meter.create_histogram(
            "graphile_worker.job.duration",
            unit="s",
            description="Seconds each job run took, by outcome",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.fetch_size = meter.create_histogram(
            "graphile_worker.fetch.size",
            unit="{job}",
            description="Jobs locked by each fetch statement",
            explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS),
        )
        self.write_size = meter.create_histogram(
            "graphile_worker.write.size",
            unit="{job}",
            description="Job outcomes written by each statement, by outcome",
            explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS),
        )

    def attributes(self, key: _Key, outcome: str | None = None) -> _Attributes:
        """The (cached) attribute dict of a task, queue and optional outcome."""
        full = (key[0], key[1], outcome)
        found = self._attributes.get(full)
        if found is None:
            found = {"task": key[0]}
            if key[1] is not None:
                found["queue"] = key[1]
            if outcome is not None:
                found["outcome"] = outcome
            self._attributes[full] = found
        return found

    def add(self, name: str, key: _Key, amount: int = 1) -> None:
        totals = self._totals[name]
        # Handler threads count starts while the loop counts outcomes.
        with self._lock:
            totals[key] = totals.get(key, 0) + amount

    def _observe(self, name: str, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._totals[name].items())
        return [Observation(value, self.attributes(key)) for key, value in items]


_job_metrics: weakref.WeakKeyDictionary[Any, _JobMetrics] = weakref.WeakKeyDictionary()
_job_metrics_lock = threading.Lock()


def _metrics_for(provider: MeterProvider) -> _JobMetrics:
    with _job_metrics_lock:
        found = _job_metrics.get(provider)
        if found is None:
            found = _job_metrics[provider] = _JobMetrics(provider.get_meter(_NAME, __version__))
        return found


# -- instrumentation ---------------------------------------------------------------------


class _RunSpan:
    __slots__ = ("span", "start", "worker_id")

    def __init__(self, span: Span, start: int, worker_id: str | None) -> None:
        self.span = span
        self.start = start
        self.worker_id = worker_id


class _RunScope:
    """The ``job_run_context`` manager: counts the start, makes the run span current."""

    __slots__ = ("_instrumentation", "_job", "_token")

    def __init__(self, instrumentation: Instrumentation, job: Job) -> None:
        self._instrumentation = instrumentation
        self._job = job
        self._token: object | None = None

    def __enter__(self) -> None:
        self._token = self._instrumentation._started(self._job)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]


class _AddScope:
    """The ``job_add_context`` manager: the add span, current while the call runs."""

    __slots__ = ("_ctx", "_instrumentation", "_span", "_token")

    def __init__(self, instrumentation: Instrumentation, ctx: JobAddContext) -> None:
        self._instrumentation = instrumentation
        self._ctx = ctx
        self._span: Span | None = None
        self._token: object | None = None

    def __enter__(self) -> None:
        tracer = self._instrumentation._tracer
        if tracer is None:
            return
        span = self._span = tracer.start_span(
            self._ctx.operation,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": self._ctx.operation,
            },
        )
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def __exit__(self, exc_type: object, error: BaseException | None, _tb: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        jobs = self._ctx.jobs
        self._instrumentation._added(jobs)
        span = self._span
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        identifiers = {job.task_identifier for job in jobs}
        if len(identifiers) == 1:
            span.update_name(f"{self._ctx.operation} {identifiers.pop()}")
        if len(jobs) == 1:
            job = jobs[0]
            span.set_attributes(_job_attributes(job))
        else:
            span.set_attribute(_A_COUNT, len(jobs))
            span.set_attribute("messaging.batch.message_count", len(jobs))
        span.end()


def _job_attributes(job: Job) -> _Attributes:
    attributes: _Attributes = {
        "messaging.message.id": str(job.id),
        _A_JOB_ID: job.id,
        _A_TASK: job.task_identifier,
    }
    if job.queue_name is not None:
        attributes[_A_QUEUE] = job.queue_name
    return attributes


class _Recorder:
    """Records what the worker's event loop reports, in a thread of its own.

    The loop only queues each outcome (a fraction of a microsecond); the SDK calls that
    end spans and record durations (several microseconds each) run here, largely while
    the loop waits on the database, instead of between its statements. The thread
    hands the interpreter lock back every few records so the loop never waits long.
    """

    _CHUNK = 16

    def __init__(self) -> None:
        self._items: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def put(self, record: Callable[[Any], None], item: Any) -> None:
        self._items.append((record, item))
        if not self._wake.is_set():
            self._wake.set()
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="sqla_graphile-otel", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        items = self._items
        while True:
            self._wake.wait()
            self._wake.clear()
            done = 0
            while items:
                record, item = items.popleft()
                try:
                    record(item)
                except Exception:
                    logger.exception("recording telemetry failed")
                done += 1
                if done % self._CHUNK == 0:
                    time.sleep(0)  # hand the interpreter lock to the loop if it waits

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything queued so far is recorded; whether it was in time."""
        if self._thread is None:
            return True
        recorded = threading.Event()
        self.put(lambda _item: recorded.set(), None)
        return recorded.wait(timeout)


class Instrumentation:
    """What :func:`instrument` attached to a :class:`~sqla_graphile.hooks.Hooks`.

    The hooks keep it alive. Outcomes are recorded in a thread of its own, off the
    worker's event loop: :meth:`flush` waits for them (a worker's stop does).
    """

    def __init__(
        self,
        hooks: Hooks,
        tracer: Tracer | None,
        job_metrics: _JobMetrics | None,
        *,
        carry_trace_context: bool,
        by_queue: bool,
    ) -> None:
        self.hooks = hooks
        self._tracer = tracer
        self._metrics = job_metrics
        self.carry_trace_context = carry_trace_context
        self.by_queue = by_queue
        self._spans: dict[int, _RunSpan] = {}
        self._recorder = _Recorder()

    @property
    def tracing(self) -> bool:
        """Whether spans are made."""
        return self._tracer is not None

    @property
    def metrics(self) -> bool:
        """Whether job metrics are recorded."""
        return self._metrics is not None

    @property
    def open_spans(self) -> int:
        """Run spans started whose job's outcome has not been recorded yet."""
        return len(self._spans)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every outcome reported so far is recorded; whether it was in time.

        Outcomes are recorded in a thread of the instrumentation's, shortly after the
        worker wrote them; a worker's stop waits for it, so after ``run_once()`` (or
        ``run()``) returns everything is recorded.
        """
        return self._recorder.flush(timeout)

    def _attach(self) -> None:
        hooks = self.hooks
        if self.carry_trace_context:
            hooks.before_job_schedule(self._inject)
            hooks.before_job_run(self._strip)
        hooks.job_run_context(self._run_scope)
        hooks.job_add_context(self._add_scope)
        # On the loop, outcomes are only queued for the recorder (see _Recorder).
        put = self._recorder.put
        hooks.on("job_complete")(functools.partial(put, self._completed))
        hooks.on("job_fail")(functools.partial(put, self._failed))
        hooks.on("job_permanently_fail")(functools.partial(put, self._failed))
        hooks.on("job_lock_lost")(functools.partial(put, self._lock_lost))
        if self._tracer is not None:
            hooks.on("worker_fence")(functools.partial(put, self._fenced))
        if self._metrics is not None:
            hooks.on("jobs_fetched")(functools.partial(put, self._fetched))
            hooks.on("jobs_written")(functools.partial(put, self._written))
        hooks.on("worker_stop")(self._on_stop)

    def _key(self, job: Job) -> _Key:
        if not self.by_queue:
            return (job.task_identifier, None)
        return (job.task_identifier, job.queue_name or "")

    # -- trace context in payloads (opt-in) -----------------------------------------

    def _inject(self, ctx: BeforeJobScheduleContext) -> Continue | None:
        payload = ctx.payload
        if type(payload) is not dict:
            return None  # only a JSON object can carry it
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        if not carrier:
            return None
        return Continue({**payload, TRACE_CONTEXT_KEY: carrier})

    def _strip(self, ctx: BeforeJobRunContext) -> Continue | None:
        payload = ctx.payload
        if type(payload) is dict and TRACE_CONTEXT_KEY in payload:
            return Continue({k: v for k, v in payload.items() if k != TRACE_CONTEXT_KEY})
        return None

    def _links(self, job: Job) -> Sequence[Link] | None:
        payload = job.payload
        if type(payload) is not dict:
            return None
        carrier = payload.get(TRACE_CONTEXT_KEY)
        if type(carrier) is not dict:
            return None
        context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        return [Link(context)] if context.is_valid else None

    # -- adding -----------------------------------------------------------------------

    def _add_scope(self, ctx: JobAddContext) -> AbstractContextManager[None]:
        return _AddScope(self, ctx)

    def _added(self, jobs: list[Job]) -> None:
        job_metrics = self._metrics
        if job_metrics is None:
            return
        counts: dict[_Key, int] = {}
        for job in jobs:
            key = self._key(job)
            counts[key] = counts.get(key, 0) + 1
        for key, count in counts.items():
            job_metrics.add("added", key, count)

    # -- running ----------------------------------------------------------------------

    def _run_scope(self, job: Job) -> AbstractContextManager[None]:
        return _RunScope(self, job)

    def _started(self, job: Job) -> object | None:
        """Count the start; start the run span and make it current (its token)."""
        if self._metrics is not None:
            self._metrics.add("started", self._key(job))
        if self._tracer is None:
            return None
        span = self._start_span(job, time.time_ns())
        return otel_context.attach(trace.set_span_in_context(span))

    def _start_span(self, job: Job, start: int) -> Span:
        assert self._tracer is not None
        # Few attributes: each costs the SDK about a microsecond, on every job.
        attributes: _Attributes = {
            "messaging.system": _SYSTEM,
            _A_JOB_ID: job.id,
            _A_TASK: job.task_identifier,
            _A_ATTEMPT: job.attempts,
        }
        if job.queue_name is not None:
            attributes[_A_QUEUE] = job.queue_name
        span = self._tracer.start_span(
            f"run {job.task_identifier}",
            context=_ROOT,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=self._links(job) if self.carry_trace_context else None,
            start_time=start,
        )
        self._spans[job.id] = _RunSpan(span, start, job.locked_by)
        return span

    def _end(
        self,
        job: Job,
        outcome: str,
        duration: float,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        if self._tracer is None:
            return
        run = self._spans.pop(job.id, None)
        if run is None:
            # No handler ran (an interceptor skipped or failed the job): a span still
            # records the outcome.
            start = time.time_ns() - int(duration * 1e9)
            self._start_span(job, start)
            run = self._spans.pop(job.id)
        span = run.span
        span.set_attribute(_A_OUTCOME, outcome)
        if error is not None:
            if exception is not None:
                span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, error.split("\n", 1)[0]))
        span.end(end_time=run.start + int(duration * 1e9))

    def _completed(self, event: JobCompleteEvent) -> None:
        job = event.job
        job_metrics = self._metrics
        if job_metrics is not None:
            key = self._key(job)
            job_metrics.add("completed", key)
            # An empty context: no exemplar to look for, the loop runs in no span.
            job_metrics.duration.record(
                event.duration, job_metrics.attributes(key, "completed"), _ROOT
            )
        self._end(job, "completed", event.duration)

    def _failed(self, event: JobFailEvent) -> None:
        job = event.job
        outcome = "retried" if event.will_retry else "permanently_failed"
        job_metrics = self._metrics
        if job_metrics is not None:
            key = self._key(job)
            job_metrics.add("failed", key)
            job_metrics.add(outcome, key)
            job_metrics.duration.record(event.duration, job_metrics.attributes(key, outcome), _ROOT)
        self._end(job, outcome, event.duration, event.error, event.exception)

    def _lock_lost(self, event: JobLockLostEvent) -> None:
        if self._metrics is not None:
            self._metrics.add("lock_lost", self._key(event.job))
        run = self._spans.get(event.job.id)
        if run is not None:
            self._end(event.job, "lock_lost", (time.time_ns() - run.start) / 1e9)

    def _fenced(self, event: WorkerFenceEvent) -> None:
        if event.fenced:
            self._abandon(lambda job_id, _run: job_id in event.job_ids)

    def _on_stop(self, event: WorkerStopEvent) -> None:
        if self._tracer is not None:
            # Every outcome is written by now (and queued before this): what is still
            # open after them was given up.
            self._recorder.put(self._stopped, event.worker_id)
        if not self.flush(_FLUSH_TIMEOUT):
            logger.warning("telemetry of the worker's last jobs is still being recorded")

    def _stopped(self, worker_id: str) -> None:
        self._abandon(lambda _job_id, run: run.worker_id == worker_id)

    def _abandon(self, which: Callable[[int, _RunSpan], bool]) -> None:
        now = time.time_ns()
        for job_id, run in list(self._spans.items()):
            if which(job_id, run):
                del self._spans[job_id]
                run.span.set_attribute(_A_OUTCOME, "abandoned")
                run.span.end(end_time=now)

    def _fetched(self, event: JobsFetchedEvent) -> None:
        assert self._metrics is not None
        self._metrics.fetch_size.record(len(event.jobs))

    def _written(self, event: JobsWrittenEvent) -> None:
        assert self._metrics is not None
        self._metrics.write_size.record(event.size, {"outcome": event.outcome})


def _hooks_of(target: object, what: str) -> Hooks:
    """The :class:`Hooks` of ``target``: itself, or the ``hooks`` of a worker or utils."""
    if isinstance(target, Hooks):
        return target
    hooks = getattr(target, "hooks", None)
    if isinstance(hooks, Hooks):
        return hooks
    if hasattr(target, "hooks"):
        raise InvalidArgument(
            f"{type(target).__name__} has no hooks to instrument: create it with "
            "hooks=Hooks() and instrument those hooks"
        )
    raise InvalidArgumentType(
        f"{what} takes a Hooks, a Worker or a WorkerUtils, not {type(target).__name__}"
    )


def instrument(
    target: object,
    *,
    tracer_provider: TracerProviderType | None = None,
    meter_provider: MeterProvider | None = None,
    tracing: bool = True,
    metrics: bool = True,
    carry_trace_context: bool = False,
    by_queue: bool = True,
) -> Instrumentation:
    """Attach tracing and job metrics to ``target``'s hooks; returns what was attached.

    ``target`` is a :class:`~sqla_graphile.hooks.Hooks`, or a ``Worker`` or
    ``WorkerUtils`` (their ``hooks``). Give the worker and the utils that add jobs the
    same hooks, and instrument them once (a second call raises
    :class:`~sqla_graphile.errors.InvalidArgument`).

    ``tracer_provider`` / ``meter_provider`` default to OpenTelemetry's global ones.
    ``tracing`` / ``metrics`` turn either half off. ``carry_trace_context`` stores the
    adding span's W3C trace context in each added job's payload (JSON objects only)
    under :data:`TRACE_CONTEXT_KEY`, so the run span links to it; the worker removes the
    key before the handler sees the payload. Turn it on where jobs are added *and* where
    they run, and only when every handler of those jobs is a Python one: a Node handler
    would see the key. ``by_queue=False`` leaves the ``queue`` attribute off job metrics
    (one series per task), for applications with many named queues.
    """
    hooks = _hooks_of(target, "instrument")
    if hooks in _instrumented:
        raise InvalidArgument("these hooks are already instrumented")
    tracer = (
        trace.get_tracer(_NAME, __version__, tracer_provider=tracer_provider) if tracing else None
    )
    job_metrics = None
    if metrics:
        job_metrics = _metrics_for(
            meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        )
    instrumentation = Instrumentation(
        hooks,
        tracer,
        job_metrics,
        carry_trace_context=carry_trace_context,
        by_queue=by_queue,
    )
    instrumentation._attach()
    _instrumented.add(hooks)
    return instrumentation


# -- queue gauges -----------------------------------------------------------------------


class QueueObserver:
    """Gauges of the jobs table, from one query per ``interval`` (see :func:`observe_queues`).

    The gauges (attributes ``task`` and ``queue``):

    ``graphile_worker.queue.jobs``
        jobs by ``state``: ``runnable`` (due now), ``scheduled`` (due later),
        ``locked`` and ``permanently_failed``;
    ``graphile_worker.queue.oldest_runnable_age``
        seconds the oldest runnable job has been due (``0``: none is waiting);
    ``graphile_worker.queue.oldest_lock_age``
        seconds the oldest job lock has been held (``0``: no lock).

    A task and queue seen once keeps reporting (zeros once empty) for the observer's
    life, so alerts on "no runnable jobs" see a zero rather than a missing series.
    """

    def __init__(
        self,
        engine: Engine,
        schema: str,
        *,
        interval: float,
        timeout: float,
        by_queue: bool,
        owns_engine: bool,
    ) -> None:
        self.engine = engine
        self.schema = schema
        self.interval = interval
        self.timeout = timeout
        self.by_queue = by_queue
        self._owns_engine = owns_engine
        self._lock = threading.Lock()
        self._sampled_at: float | None = None
        self._samples: list[QueueSample] = []
        self._seen: set[tuple[str, str | None]] = set()
        self._closed = False
        self.queries = 0
        """Queries run so far."""

    def sample(self) -> list[QueueSample]:
        """Read the jobs table now; the gauges report this sample until it is stale.

        Per task and queue (queues merged per task with ``by_queue=False``), including
        zeros for groups seen before. Raises what the query raised.
        """
        with self._lock:
            with self.engine.begin() as connection:
                rows = read_queue_samples(connection, self.schema, self.timeout)
            self.queries += 1
            self._sampled_at = time.monotonic()
            self._samples = self._grouped(rows)
            return list(self._samples)

    def _grouped(self, rows: list[QueueSample]) -> list[QueueSample]:
        groups: dict[tuple[str, str | None], list[QueueSample]] = {}
        for row in rows:
            key = (row.task_identifier, row.queue_name if self.by_queue else None)
            groups.setdefault(key, []).append(row)
        self._seen.update(groups)
        result = []
        for key in sorted(self._seen, key=lambda k: (k[0], k[1] or "")):
            members = groups.get(key, [])
            result.append(
                QueueSample(
                    key[0],
                    key[1],
                    sum(m.runnable for m in members),
                    sum(m.scheduled for m in members),
                    sum(m.locked for m in members),
                    sum(m.permanently_failed for m in members),
                    _oldest(m.oldest_runnable_age for m in members),
                    _oldest(m.oldest_lock_age for m in members),
                )
            )
        return result

    def _current(self) -> list[QueueSample]:
        """The sample for a gauge: the last one unless it is older than the interval."""
        if self._closed:
            return []
        sampled_at = self._sampled_at
        if sampled_at is not None and time.monotonic() - sampled_at < self.interval:
            return self._samples
        try:
            return self.sample()
        except Exception as exc:
            logger.warning("reading the queue gauges failed: %s", str(exc).strip().split("\n")[0])
            # The other gauges of this collection do not try again.
            self._sampled_at, self._samples = time.monotonic(), []
            return []

    def _attributes(self, sample: QueueSample) -> _Attributes:
        attributes: _Attributes = {"task": sample.task_identifier}
        if self.by_queue:
            attributes["queue"] = sample.queue_name or ""
        return attributes

    def _observe_jobs(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for sample in self._current():
            attributes = self._attributes(sample)
            for state, value in (
                ("runnable", sample.runnable),
                ("scheduled", sample.scheduled),
                ("locked", sample.locked),
                ("permanently_failed", sample.permanently_failed),
            ):
                observations.append(Observation(value, {**attributes, "state": state}))
        return observations

    def _observe_runnable_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.oldest_runnable_age or 0.0, self._attributes(sample))
            for sample in self._current()
        ]

    def _observe_lock_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.oldest_lock_age or 0.0, self._attributes(sample))
            for sample in self._current()
        ]

    def close(self) -> None:
        """Stop querying (the gauges then report nothing); dispose of an engine it made."""
        self._closed = True
        if self._owns_engine:
            self.engine.dispose()


class _QueueGauges:
    """The queue gauges of one meter provider; they report what its observer reads.

    Instruments cannot be removed, so a provider keeps its gauges, and an observer made
    after an earlier one was closed takes its place behind them.
    """

    def __init__(self, meter: Meter) -> None:
        self.observer: QueueObserver | None = None
        meter.create_observable_gauge(
            "graphile_worker.queue.jobs",
            callbacks=[self._jobs],
            unit="{job}",
            description="Jobs by state (runnable, scheduled, locked, permanently_failed)",
        )
        meter.create_observable_gauge(
            "graphile_worker.queue.oldest_runnable_age",
            callbacks=[self._runnable_age],
            unit="s",
            description="Seconds the oldest runnable job has been due",
        )
        meter.create_observable_gauge(
            "graphile_worker.queue.oldest_lock_age",
            callbacks=[self._lock_age],
            unit="s",
            description="Seconds the oldest job lock has been held",
        )

    def _jobs(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_jobs(options) if observer is not None else []

    def _runnable_age(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_runnable_age(options) if observer is not None else []

    def _lock_age(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_lock_age(options) if observer is not None else []


_queue_gauges: weakref.WeakKeyDictionary[Any, _QueueGauges] = weakref.WeakKeyDictionary()
_queue_gauges_lock = threading.Lock()


def _oldest(ages: Iterable[float | None]) -> float | None:
    known = [age for age in ages if age is not None]
    return max(known) if known else None


def observe_queues(
    bind: Engine | str | URL | Any,
    *,
    schema: str | None = None,
    meter_provider: MeterProvider | None = None,
    interval: float = 15.0,
    timeout: float = 5.0,
    by_queue: bool = True,
) -> QueueObserver:
    """Register gauges of runnable, scheduled, locked and failed jobs and their ages.

    ``bind`` is a sync ``Engine``, a database URL, or a ``Worker`` (its engine and
    schema). The gauges are read at each metrics collection from one aggregate query
    (a sequential scan of the jobs table), run at most once per ``interval`` seconds
    whatever the number of readers, and bounded by ``timeout`` seconds; a failed query
    is logged and the gauges report nothing that time. Observe queues once per
    database, not in every worker process: every process would report the same numbers.
    ``by_queue=False`` merges the named queues of each task.
    """
    if interval < MIN_QUEUE_INTERVAL:
        raise InvalidArgument(f"interval must be at least {MIN_QUEUE_INTERVAL:g} s")
    if timeout <= 0:
        raise InvalidArgument("timeout must be positive")
    owns = False
    if isinstance(bind, Engine):
        engine = bind
    elif isinstance(bind, (str, URL)):
        engine, owns = engine_from_url(normalize_url(bind)), True
    else:
        create_utils = getattr(bind, "create_utils", None)
        if create_utils is None:
            raise InvalidArgumentType(
                f"observe_queues takes an Engine, a database URL or a Worker, "
                f"not {type(bind).__name__}"
            )
        engine = create_utils().bind
        schema = bind.schema if schema is None else schema
    schema = validate_schema_name(schema if schema is not None else DEFAULT_SCHEMA)
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    with _queue_gauges_lock:
        gauges = _queue_gauges.get(provider)
        if gauges is None:
            gauges = _queue_gauges[provider] = _QueueGauges(provider.get_meter(_NAME, __version__))
        if gauges.observer is not None and not gauges.observer._closed:
            raise InvalidArgument("queues are already observed on this meter provider")
        observer = QueueObserver(
            engine, schema, interval=interval, timeout=timeout, by_queue=by_queue, owns_engine=owns
        )
        gauges.observer = observer
    return observer
