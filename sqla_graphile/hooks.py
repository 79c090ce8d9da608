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
Returning ``None`` continues with the payload unchanged.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import JobScheduleFailed, JobScheduleSkipped
from .specs import JobSpec

__all__ = [
    "EVENTS",
    "BeforeJobScheduleContext",
    "Continue",
    "Fail",
    "Hooks",
    "ScheduleDecision",
    "Skip",
]

logger = logging.getLogger("sqla_graphile.hooks")

#: Lifecycle events the worker emits (observers receive one event object each).
EVENTS = frozenset(
    {
        "worker_start",
        "worker_stop",
        "job_fetch",
        "job_start",
        "job_complete",
        "job_fail",
        "job_permanently_fail",
        "job_lock_lost",
        "worker_recovered",
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


@dataclass(frozen=True)
class Continue:
    """Go on scheduling, with this payload."""

    payload: Any


@dataclass(frozen=True)
class Skip:
    """Do not schedule the job (the add raises ``JobScheduleSkipped``)."""


@dataclass(frozen=True)
class Fail:
    """Refuse the job (the add raises ``JobScheduleFailed`` with this message)."""

    message: str


ScheduleDecision = Continue | Skip | Fail | None
ScheduleHook = Callable[[BeforeJobScheduleContext], ScheduleDecision]
Observer = Callable[[Any], "Awaitable[None] | None"]
_F = TypeVar("_F", bound=Callable[..., Any])


class Hooks:
    """A registry of schedule interceptors, job interceptors and event observers."""

    def __init__(self) -> None:
        self._schedule: list[ScheduleHook] = []
        self._observers: dict[str, list[Observer]] = defaultdict(list)
        self.before_job_run_hooks: list[Callable[..., Any]] = []
        self.after_job_run_hooks: list[Callable[..., Any]] = []

    def __bool__(self) -> bool:
        return bool(
            self._schedule
            or any(self._observers.values())
            or self.before_job_run_hooks
            or self.after_job_run_hooks
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

    def on(self, event: str) -> Callable[[_F], _F]:
        """Register an observer of a lifecycle event (a decorator)."""
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}; known: {', '.join(sorted(EVENTS))}")

        def register(fn: _F) -> _F:
            self._observers[event].append(fn)
            return fn

        return register

    def observers(self, event: str) -> list[Observer]:
        """The observers registered for ``event``."""
        return list(self._observers.get(event, ()))

    async def emit(self, event: str, payload: Any) -> None:
        """Call every observer of ``event``; an observer's error is logged, not raised."""
        for observer in self._observers.get(event, ()):
            try:
                result = observer(payload)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("hook %s for %r failed", getattr(observer, "__name__", "?"), event)

    def schedule(self, identifier: str, payload: Any, spec: JobSpec) -> Any:
        """Run the schedule interceptors; return the payload to store.

        Raises :class:`JobScheduleSkipped` or :class:`JobScheduleFailed`.
        """
        for hook in self._schedule:
            decision = hook(BeforeJobScheduleContext(identifier, payload, spec))
            if decision is None:
                continue
            if isinstance(decision, Continue):
                payload = decision.payload
            elif isinstance(decision, Skip):
                raise JobScheduleSkipped(f"job {identifier!r} was skipped by a schedule hook")
            elif isinstance(decision, Fail):
                raise JobScheduleFailed(f"job {identifier!r} was refused: {decision.message}")
            else:
                raise TypeError(
                    "a before_job_schedule hook must return Continue, Skip, Fail or None, "
                    f"not {decision!r}"
                )
        return payload
