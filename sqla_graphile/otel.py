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

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace import TracerProvider as TracerProviderType
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "sqla_graphile.otel needs the OpenTelemetry API: pip install 'sqla-graphile[otel]'"
    ) from exc


from ._otel_metrics import (
    _A_ATTEMPT,
    _A_COUNT,
    _A_JOB_ID,
    _A_OUTCOME,
    _A_QUEUE,
    _A_TASK,
    ADDED,
    COMPLETED,
    DURATION_BUCKETS,
    FAILED,
    LOCK_LOST,
    PERMANENTLY_FAILED,
    RETRIED,
    SIZE_BUCKETS,
    STARTED,
    _Attributes,
    _JobMetrics,
    _Key,
    _metrics_for,
)
from ._otel_queues import MIN_QUEUE_INTERVAL, QueueObserver, observe_queues
from ._queue_metrics import QueueSample
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


_NAME = "sqla_graphile"
_SYSTEM = "graphile_worker"
_PROPAGATOR = TraceContextTextMapPropagator()
# Run spans start traces of their own, whatever happens to be current in the worker.
_ROOT = otel_context.Context()


_instrumented: weakref.WeakSet[Hooks] = weakref.WeakSet()
# The run context of a job with no run span (a no-op; it holds no state).
_UNSCOPED = contextlib.nullcontext()
# The counters each outcome adds to.
_COMPLETED = (COMPLETED,)
_RETRIED = (FAILED, RETRIED)
_PERMANENTLY_FAILED = (FAILED, PERMANENTLY_FAILED)
_WRITTEN: dict[str, _Attributes] = {
    "complete": {"outcome": "complete"},
    "fail": {"outcome": "fail"},
}


# -- instrumentation ---------------------------------------------------------------------


class _RunSpan:
    __slots__ = ("span", "start", "worker_id")

    def __init__(self, span: Span, start: int, worker_id: str | None) -> None:
        self.span = span
        self.start = start
        self.worker_id = worker_id


class _RunScope:
    """The ``job_run_context`` manager of a chosen job: its run span, current."""

    __slots__ = ("_instrumentation", "_job", "_token")

    def __init__(self, instrumentation: Instrumentation, job: Job) -> None:
        self._instrumentation = instrumentation
        self._job = job
        self._token: object | None = None

    def __enter__(self) -> None:
        self._token = self._instrumentation._open_span(self._job)

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


class Instrumentation:
    """What :func:`instrument` attached to a :class:`~sqla_graphile.hooks.Hooks`.

    The hooks keep it alive. Outcomes are recorded on the worker's event loop as they
    are written: every one adds to the counters' totals, kept in process; the SDK is
    called per job only for the jobs ``sample_runs`` chose (a span and a duration).
    """

    def __init__(
        self,
        hooks: Hooks,
        tracer: Tracer | None,
        job_metrics: _JobMetrics | None,
        *,
        carry_trace_context: bool,
        by_queue: bool,
        sample_runs: float,
    ) -> None:
        self.hooks = hooks
        self._tracer = tracer
        self._metrics = job_metrics
        self.carry_trace_context = carry_trace_context
        self.by_queue = by_queue
        self.sample_runs = sample_runs
        # Jobs whose id hashes (Knuth's multiplicative hash) below this get run spans.
        self._chosen_below = int(sample_runs * 2**32)
        self._every = sample_runs >= 1.0
        self._spans: dict[int, _RunSpan] = {}

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

    def _attach(self) -> None:
        hooks = self.hooks
        if self.carry_trace_context:
            hooks.before_job_schedule(self._inject)
            hooks.before_job_run(self._strip)
        hooks.job_run_context(self._run_scope)
        hooks.job_add_context(self._add_scope)
        hooks.on("job_complete")(self._completed)
        hooks.on("job_fail")(self._failed)
        hooks.on("job_permanently_fail")(self._failed)
        hooks.on("job_lock_lost")(self._lock_lost)
        if self._tracer is not None:
            hooks.on("worker_fence")(self._fenced)
            hooks.on("worker_stop")(self._stopped)
        if self._metrics is not None:
            hooks.on("jobs_fetched")(self._fetched)
            hooks.on("jobs_written")(self._written)

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
            job_metrics.tally(key)[ADDED] += count

    # -- running ----------------------------------------------------------------------

    def _run_scope(self, job: Job) -> AbstractContextManager[None]:
        """Count the start (in the handler's thread or task, just before it runs)."""
        if self._metrics is not None:
            self._metrics.tally(self._key(job))[STARTED] += 1
        if self._tracer is None or not self._chosen(job):
            return _UNSCOPED
        return _RunScope(self, job)

    def _open_span(self, job: Job) -> object:
        """Start the run span and make it current; the token to detach."""
        span = self._start_span(job, time.time_ns())
        return otel_context.attach(trace.set_span_in_context(span))

    def _chosen(self, job: Job) -> bool:
        """Whether ``job``'s runs are recorded one by one (a span, a duration).

        The same answer for each of its attempts.
        """
        return self._every or (job.id * 0x9E3779B1) & 0xFFFFFFFF < self._chosen_below

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
        self._ended(event.job, _COMPLETED, "completed", event.duration)

    def _failed(self, event: JobFailEvent) -> None:
        if event.will_retry:
            counted, outcome = _RETRIED, "retried"
        else:
            counted, outcome = _PERMANENTLY_FAILED, "permanently_failed"
        self._ended(event.job, counted, outcome, event.duration, event.error, event.exception)

    def _ended(
        self,
        job: Job,
        counted: tuple[int, ...],
        outcome: str,
        duration: float,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        """Count an outcome; for a chosen job, record its duration and end its span."""
        chosen = self._chosen(job)
        job_metrics = self._metrics
        if job_metrics is not None:
            key = self._key(job)
            tally = job_metrics.tally(key)
            for place in counted:
                tally[place] += 1
            if chosen:
                attributes = job_metrics.attributes(key, outcome)
                # An empty context: no exemplar to look for, the loop runs in no span.
                job_metrics.duration.record(duration, attributes, _ROOT)
        if chosen and self._tracer is not None:
            self._end(job, outcome, duration, error, exception)

    def _lock_lost(self, event: JobLockLostEvent) -> None:
        if self._metrics is not None:
            self._metrics.tally(self._key(event.job))[LOCK_LOST] += 1
        run = self._spans.get(event.job.id)
        if run is not None:
            self._end(event.job, "lock_lost", (time.time_ns() - run.start) / 1e9)

    def _fenced(self, event: WorkerFenceEvent) -> None:
        if event.fenced:
            self._abandon(lambda job_id, _run: job_id in event.job_ids)

    def _stopped(self, event: WorkerStopEvent) -> None:
        # Every outcome is written and recorded by now: what is still open was given up.
        worker_id = event.worker_id
        self._abandon(lambda _job_id, run: run.worker_id == worker_id)

    def _abandon(self, which: Callable[[int, _RunSpan], bool]) -> None:
        now = time.time_ns()
        for job_id, run in list(self._spans.items()):
            if which(job_id, run):
                del self._spans[job_id]
                run.span.set_attribute(_A_OUTCOME, "abandoned")
                run.span.end(end_time=now)

    def _fetched(self, event: JobsFetchedEvent) -> None:
        job_metrics = self._metrics
        assert job_metrics is not None
        job_metrics.fetch_size.record(len(event.jobs), None, _ROOT)

    def _written(self, event: JobsWrittenEvent) -> None:
        job_metrics = self._metrics
        assert job_metrics is not None
        attributes = _WRITTEN.get(event.outcome) or {"outcome": event.outcome}
        job_metrics.write_size.record(event.size, attributes, _ROOT)


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
    sample_runs: float = 1.0,
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

    ``sample_runs`` (0 to 1) is the share of jobs whose runs are recorded one by one: a
    run span (the tracer's own sampler then still applies) and a point in the duration
    histogram. Jobs are chosen by id: every attempt of a chosen job, none of the
    others. The counters count every job whatever the share. Each span, each histogram
    point and each span a sampler drops costs the OpenTelemetry SDK microseconds, as
    much as a no-op job's whole run: for busy workers choose the share here
    (``sample_runs=0.01``), not in the sampler. Add spans are not affected.
    """
    if type(sample_runs) not in (int, float):
        raise InvalidArgumentType(f"sample_runs must be a number, not {type(sample_runs).__name__}")
    if not 0.0 <= sample_runs <= 1.0:
        raise InvalidArgument(f"sample_runs must be between 0 and 1, not {sample_runs!r}")
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
        sample_runs=float(sample_runs),
    )
    instrumentation._attach()
    _instrumented.add(hooks)
    return instrumentation
