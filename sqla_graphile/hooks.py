"""Hooks: the ``before_job_schedule`` interceptors and the worker's lifecycle events.

Register with decorators::

    hooks = Hooks()

    @hooks.before_job_schedule
    def stamp(ctx: BeforeJobScheduleContext) -> ScheduleDecision:
        return Continue({**ctx.payload, "tenant": current_tenant()})

    @hooks.on("job_complete")
    def count(event): metrics.inc("jobs_done")

Schedule interceptors run in registration order, each on the payload the previous one
produced; the first :class:`Skip` or :class:`Fail` stops the chain and nothing is written.
Returning ``None`` (or ``Continue()``) continues with the payload unchanged.

The worker's job interceptors follow the same pattern::

    @hooks.before_job_run
    async def gate(ctx: BeforeJobRunContext) -> JobRunDecision:
        if ctx.job.task_identifier == "paused":
            return Fail("paused by the operator")   # a normal failure, retried later
        return None                                 # run the handler

    @hooks.after_job_run
    def ignore_timeouts(ctx: AfterJobRunContext) -> JobRunDecision:
        if isinstance(ctx.error, TimeoutError):
            return Skip()                           # count it as a success
        return None

``before_job_run``: ``Continue(payload)`` hands the handler another payload, ``Skip()``
completes the job without running it, ``Fail(message)`` fails it. ``after_job_run``:
``Skip()`` turns the outcome into a success, ``Fail(message)`` into a failure. Hooks may be
``def`` or ``async def``; they run on the worker's event loop, so keep ``def`` hooks quick.

Context hooks wrap a piece of work in a context manager of the application's, entered
where the work runs (for tracing, or context variables such as a logging scope); they
cannot change what happens::

    @hooks.job_run_context
    def scope(job: Job) -> AbstractContextManager[object]:
        return bind_log_context(job_id=job.id)   # entered around the handler

    @hooks.job_add_context
    def adding(ctx: JobAddContext) -> AbstractContextManager[object]:
        return timer(ctx.operation)              # entered around add_job, add_jobs, ...

A ``job_run_context`` manager is entered in the thread of a ``def`` handler (in the task
of an ``async def`` one) right before the handler and exited when it returns or raises;
unlike ``before_job_run`` interceptors it costs the worker no extra task per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InvalidArgument, InvalidHookResult, JobScheduleFailed, JobScheduleSkipped
from .job import Job
from .specs import JobSpec

__all__ = [
    "EVENTS",
    "UNCHANGED",
    "AfterJobRunContext",
    "BeforeJobRunContext",
    "BeforeJobScheduleContext",
    "Continue",
    "Fail",
    "Hooks",
    "JobAddContext",
    "JobCompleteEvent",
    "JobEvent",
    "JobFailEvent",
    "JobLockLostEvent",
    "JobRunDecision",
    "JobsFetchedEvent",
    "JobsWrittenEvent",
    "ScheduleDecision",
    "Skip",
    "WorkerFenceEvent",
    "WorkerRecoveredEvent",
    "WorkerStartEvent",
    "WorkerStopEvent",
]

logger = logging.getLogger("sqla_graphile.hooks")

#: Lifecycle events the worker emits (observers receive one event object each).
EVENTS = frozenset(
    {
        "worker_start",
        "worker_stop",
        "job_fetch",
        "jobs_fetched",
        "job_start",
        "job_complete",
        "job_fail",
        "job_permanently_fail",
        "job_lock_lost",
        "jobs_written",
        "worker_recovered",
        "worker_fence",
        "cron_tick",
        "cron_job_scheduled",
    }
)


@dataclass(frozen=True)
class BeforeJobScheduleContext:
    """What a schedule interceptor sees: the task, the (JSON) payload so far, the spec."""

    identifier: str
    payload: Any
    spec: JobSpec


class _Unchanged:
    """The type of :data:`UNCHANGED`."""

    def __repr__(self) -> str:
        return "UNCHANGED"


#: ``Continue()``'s payload when none is given: keep the payload as it is.
UNCHANGED: Any = _Unchanged()


@dataclass(frozen=True)
class Continue:
    """Go on (scheduling, or running the job), with this payload if one is given."""

    payload: Any = UNCHANGED


@dataclass(frozen=True)
class Skip:
    """Do not schedule the job (the add raises ``JobScheduleSkipped``)."""


@dataclass(frozen=True)
class Fail:
    """Refuse the job (the add raises ``JobScheduleFailed`` with this message)."""

    message: str


ScheduleDecision = Continue | Skip | Fail | None
JobRunDecision = Continue | Skip | Fail | None
ScheduleHook = Callable[[BeforeJobScheduleContext], ScheduleDecision]


# -- the worker's events ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStartEvent:
    """``worker_start``: a worker began (after its database checks, before fetching)."""

    worker_id: str
    schema: str
    concurrency: int
    task_identifiers: frozenset[str]


@dataclass(frozen=True)
class WorkerStopEvent:
    """``worker_stop``: a worker stopped; every write of its outcomes is done.

    ``reason`` is ``"finished"`` (run once), ``"graceful"``, ``"forced"``, ``"migrate"``
    (a breaking migration was announced) or ``"error"`` (then ``error`` is set).
    """

    worker_id: str
    reason: str
    error: BaseException | None = None


@dataclass(frozen=True)
class WorkerFenceEvent:
    """``worker_fence``: a worker lost its lease (``fenced``) or got it back.

    A recovery-enabled worker whose heartbeats have failed for longer than its lease
    (``sweep_threshold - heartbeat_interval``) fences itself before any peer may judge it
    dead: it stops starting jobs and gives up ``job_ids``, the jobs it was running
    (cancelled, their outcomes not written). When a heartbeat succeeds again, the event
    comes with ``fenced=False`` and the worker resumes.
    """

    worker_id: str
    fenced: bool
    job_ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkerRecoveredEvent:
    """``worker_recovered``: a worker's sweep recovered the locks of dead workers.

    ``dead_worker_ids`` are the registered workers whose heartbeat had stopped, then the
    unregistered holders whose locks were past Node's 4-hour expiry; ``job_ids`` and
    ``queue_names`` what was unlocked.
    """

    worker_id: str
    """The worker whose sweep did the recovery."""
    dead_worker_ids: tuple[str, ...]
    job_ids: tuple[int, ...]
    queue_names: tuple[str, ...]

    @property
    def jobs_recovered(self) -> int:
        """Number of jobs unlocked."""
        return len(self.job_ids)


@dataclass(frozen=True)
class JobEvent:
    """``job_fetch`` and ``job_start``: a job was locked by, or started on, a worker."""

    job: Job
    worker_id: str


@dataclass(frozen=True)
class JobCompleteEvent:
    """``job_complete``: the job succeeded and its row is deleted."""

    job: Job
    worker_id: str
    duration: float
    """Seconds the handler ran."""


@dataclass(frozen=True)
class JobFailEvent:
    """``job_fail`` (will retry) and ``job_permanently_fail`` (out of attempts).

    ``job`` is the job as it was fetched (``attempts`` counts this attempt); ``run_at``
    is when it will be tried again.
    """

    job: Job
    worker_id: str
    error: str
    """The message stored in ``last_error``."""
    exception: BaseException | None
    will_retry: bool
    run_at: Any
    duration: float


@dataclass(frozen=True)
class JobLockLostEvent:
    """``job_lock_lost``: the job's lock was no longer ours when its outcome was written.

    Someone unlocked or took the job (the 4-hour sweep, ``force_unlock_workers``, a
    manual change); nothing was written for it. ``outcome`` is ``"complete"``,
    ``"fail"`` or ``"return"``.
    """

    job: Job
    worker_id: str
    outcome: str


@dataclass(frozen=True)
class JobsFetchedEvent:
    """``jobs_fetched``: one fetch statement locked these jobs (never an empty batch)."""

    worker_id: str
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class JobsWrittenEvent:
    """``jobs_written``: one statement wrote a batch of outcomes.

    ``outcome`` is ``"complete"`` or ``"fail"``; ``size`` is the number of outcomes the
    statement carried. Emitted before the batch's ``job_complete`` / ``job_fail`` events.
    """

    worker_id: str
    outcome: str
    size: int


@dataclass
class JobAddContext:
    """What a ``job_add_context`` hook sees: one call adding jobs.

    ``operation`` is the method called (``"add_job"``, ``"add_raw_job"``, ``"add_jobs"``,
    ``"add_raw_jobs"``, ``"bulk_add_jobs"``, ``"bulk_add_raw_jobs"`` or
    ``"add_batch_job"``). ``jobs`` is empty while the call runs and
    holds the jobs added once it has succeeded, before the context manager is exited.
    """

    operation: str
    schema: str
    jobs: list[Job] = field(default_factory=list)


@dataclass(frozen=True)
class BeforeJobRunContext:
    """What a ``before_job_run`` interceptor sees."""

    job: Job
    worker_id: str
    payload: Any
    """The payload the handler will get (JSON data), after earlier interceptors."""


@dataclass(frozen=True)
class AfterJobRunContext:
    """What an ``after_job_run`` interceptor sees: the handler's outcome."""

    job: Job
    worker_id: str
    error: BaseException | None
    """The exception the handler raised, or ``None`` on success."""
    duration: float


Observer = Callable[[Any], "Awaitable[None] | None"]
JobRunContextHook = Callable[[Job], AbstractContextManager[Any]]
JobAddContextHook = Callable[[JobAddContext], AbstractContextManager[Any]]
_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R", bound=JobRunContextHook)
_A = TypeVar("_A", bound=JobAddContextHook)


class Hooks:
    """A registry of schedule interceptors, job interceptors and event observers."""

    def __init__(self) -> None:
        self._schedule: list[ScheduleHook] = []
        self._observers: dict[str, list[Observer]] = defaultdict(list)
        self.before_job_run_hooks: list[Callable[..., Any]] = []
        self.after_job_run_hooks: list[Callable[..., Any]] = []
        self.job_run_context_hooks: list[JobRunContextHook] = []
        self.job_add_context_hooks: list[JobAddContextHook] = []
        # Tasks of async observers called from synchronous code (see emit_soon).
        self._pending: set[asyncio.Future[Any]] = set()

    def __bool__(self) -> bool:
        return bool(
            self._schedule
            or any(self._observers.values())
            or self.before_job_run_hooks
            or self.after_job_run_hooks
            or self.job_run_context_hooks
            or self.job_add_context_hooks
        )

    def before_job_schedule(self, hook: ScheduleHook) -> ScheduleHook:
        """Register a schedule interceptor (usable as a decorator)."""
        self._schedule.append(hook)
        return hook

    def before_job_run(self, hook: _F) -> _F:
        """Register an interceptor run before each job (see the worker's documentation)."""
        self.before_job_run_hooks.append(hook)
        return hook

    def after_job_run(self, hook: _F) -> _F:
        """Register an interceptor run after each job (see the worker's documentation)."""
        self.after_job_run_hooks.append(hook)
        return hook

    def job_run_context(self, hook: _R) -> _R:
        """Register ``hook(job)``, a context manager entered around each handler's run.

        It is entered where the handler runs (its thread, or its task) just before the
        handler, and exited when the handler returns or raises; it does not see, and
        cannot change, the outcome. Managers of several hooks nest in registration order.
        """
        self.job_run_context_hooks.append(hook)
        return hook

    def job_add_context(self, hook: _A) -> _A:
        """Register ``hook(ctx)``, a context manager entered around each call adding jobs.

        ``ctx`` is a :class:`JobAddContext`. The manager is entered in the caller's thread
        (or task) before the ``before_job_schedule`` interceptors run and exited after the
        call ended; an exception the call raises passes through its ``__exit__``.
        """
        self.job_add_context_hooks.append(hook)
        return hook

    def run_scope(self, job: Job) -> AbstractContextManager[Any]:
        """The ``job_run_context`` managers for ``job``, as one."""
        hooks = self.job_run_context_hooks
        if len(hooks) == 1:
            return hooks[0](job)
        return _Nested([hook(job) for hook in hooks])

    def add_scope(self, ctx: JobAddContext) -> AbstractContextManager[Any]:
        """The ``job_add_context`` managers for ``ctx``, as one (entered in order)."""
        hooks = self.job_add_context_hooks
        if len(hooks) == 1:
            return hooks[0](ctx)
        return _Nested([hook(ctx) for hook in hooks])

    def on(self, event: str) -> Callable[[_F], _F]:
        """Register an observer of a lifecycle event (a decorator)."""
        if event not in EVENTS:
            raise InvalidArgument(
                f"unknown hook event {event!r}; known: {', '.join(sorted(EVENTS))}"
            )

        def register(fn: _F) -> _F:
            self._observers[event].append(fn)
            return fn

        return register

    def observers(self, event: str) -> list[Observer]:
        """The observers registered for ``event``."""
        return list(self._observers.get(event, ()))

    def has(self, event: str) -> bool:
        """Whether ``event`` has an observer (lets the worker skip building events)."""
        return bool(self._observers.get(event))

    async def intercept_before_run(self, ctx: BeforeJobRunContext) -> Continue | Skip | Fail:
        """Run the ``before_job_run`` interceptors; the first Skip or Fail wins.

        Each interceptor sees the payload the previous ``Continue`` produced; the result
        is a ``Continue`` carrying the final payload, or the terminal decision.
        """
        payload = ctx.payload
        for hook in self.before_job_run_hooks:
            decision = await _call(hook, BeforeJobRunContext(ctx.job, ctx.worker_id, payload))
            if decision is None:
                continue
            if isinstance(decision, Continue):
                if decision.payload is not UNCHANGED:
                    payload = decision.payload
            elif isinstance(decision, (Skip, Fail)):
                return decision
            else:
                raise InvalidHookResult(
                    f"a before_job_run hook must return Continue, Skip, Fail or None, "
                    f"not {decision!r}"
                )
        return Continue(payload)

    async def intercept_after_run(self, ctx: AfterJobRunContext) -> Continue | Skip | Fail:
        """Run the ``after_job_run`` interceptors; the first Skip or Fail wins."""
        for hook in self.after_job_run_hooks:
            decision = await _call(hook, ctx)
            if decision is None or isinstance(decision, Continue):
                continue
            if isinstance(decision, (Skip, Fail)):
                return decision
            raise InvalidHookResult(
                f"an after_job_run hook must return Continue, Skip, Fail or None, not {decision!r}"
            )
        return Continue()

    async def emit(self, event: str, payload: Any) -> None:
        """Call every observer of ``event``; an observer's error is logged, not raised."""
        for observer in self._observers.get(event, ()):
            try:
                result = observer(payload)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("hook %s for %r failed", getattr(observer, "__name__", "?"), event)

    def emit_soon(self, event: str, payload: Any) -> None:
        """:meth:`emit` from synchronous code: an async observer runs as a task of its own."""
        for observer in self._observers.get(event, ()):
            try:
                result = observer(payload)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._pending.add(task)
                    task.add_done_callback(functools.partial(self._observed, event, observer))
            except Exception:
                logger.exception("hook %s for %r failed", getattr(observer, "__name__", "?"), event)

    def _observed(self, event: str, observer: Observer, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "hook %s for %r failed",
                getattr(observer, "__name__", "?"),
                event,
                exc_info=task.exception(),
            )

    def schedule(self, identifier: str, payload: Any, spec: JobSpec) -> Any:
        """Run the schedule interceptors; return the payload to store.

        Raises :class:`JobScheduleSkipped` or :class:`JobScheduleFailed`.
        """
        for hook in self._schedule:
            decision = hook(BeforeJobScheduleContext(identifier, payload, spec))
            if decision is None:
                continue
            if isinstance(decision, Continue):
                if decision.payload is not UNCHANGED:
                    payload = decision.payload
            elif isinstance(decision, Skip):
                raise JobScheduleSkipped(f"job {identifier!r} was skipped by a schedule hook")
            elif isinstance(decision, Fail):
                raise JobScheduleFailed(f"job {identifier!r} was refused: {decision.message}")
            else:
                raise InvalidHookResult(
                    "a before_job_schedule hook must return Continue, Skip, Fail or None, "
                    f"not {decision!r}"
                )
        return payload


class _Nested:
    """Context managers entered in order and exited in reverse, as one."""

    def __init__(self, managers: list[AbstractContextManager[Any]]) -> None:
        self._managers = managers
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        with self._stack as stack:
            for manager in self._managers:
                stack.enter_context(manager)
            self._stack = stack.pop_all()

    def __exit__(self, *exc_info: Any) -> bool:
        return bool(self._stack.__exit__(*exc_info))


async def _call(hook: Callable[..., Any], ctx: Any) -> Any:
    result = hook(ctx)
    if inspect.isawaitable(result):
        result = await result
    return result
