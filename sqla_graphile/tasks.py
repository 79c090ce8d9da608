"""Typed tasks: ``TaskHandler``, ``BatchTaskHandler`` and ``@task``.

A typed task is a class whose instances are its payloads — a dataclass or a pydantic
model — with an ``IDENTIFIER`` and a ``run`` method::

    @dataclass
    class SendEmail(TaskHandler):
        IDENTIFIER: ClassVar[str] = "send_email"
        to: str

        def run(self, ctx: WorkerContext) -> None: ...

    utils.add_job(SendEmail(to="a@example.com"))

``run`` may be ``def`` (the worker runs it in a thread) or ``async def`` (on the loop).

A task may carry defaults for its jobs (``QUEUE_NAME``, ``MAX_ATTEMPTS``, ``PRIORITY``,
``JOB_KEY``, ``JOB_KEY_MODE``; the keyword arguments of :func:`task`), used when the
:class:`~sqla_graphile.specs.JobSpec` of an add leaves the field unset, and a time limit
(``TIMEOUT``; ``timeout=``) the worker enforces on each of its jobs.

:func:`encode_payload` and :func:`decode_payload` are the payload codec's
(:mod:`sqla_graphile.codec`), importable from here too.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

# The payload codec's two public functions are also this module's, where they began.
from .codec import decode_payload, encode_payload, to_json_value
from .errors import InvalidArgument, InvalidArgumentType, InvalidJobKeyMode, InvalidJobSpec
from .specs import DEFAULT_SPEC, JobKeyMode, JobSpec, RawJobSpec

# A handler's ``ctx`` is a ``WorkerContext``, but it is typed ``Any`` here: the context
# refers to the utils, and the utils' typed adds to these classes, so naming it would
# close an import cycle. ``def run(self, ctx: WorkerContext)`` overrides it as it is.

__all__ = [
    "BatchTaskHandler",
    "FunctionTask",
    "TaskHandler",
    "decode_payload",
    "encode_payload",
    "task",
]

_T = TypeVar("_T")
_B = TypeVar("_B", bound="BatchTaskHandler")


class TaskHandler:
    """Base class of typed tasks; an instance is one job's payload.

    Subclasses set ``IDENTIFIER`` and implement ``run(self, ctx)``, sync or async.
    """

    IDENTIFIER: ClassVar[str]
    QUEUE_NAME: ClassVar[str | None] = None
    """Default ``queue_name`` of this task's jobs (used when the ``JobSpec`` sets none)."""
    MAX_ATTEMPTS: ClassVar[int | None] = None
    """Default ``max_attempts`` (the database's default is 25)."""
    PRIORITY: ClassVar[int | None] = None
    """Default ``priority`` (the database's default is 0; lower runs first)."""
    JOB_KEY: ClassVar[str | None] = None
    """Default ``job_key``: every job of the task then replaces the waiting one."""
    JOB_KEY_MODE: ClassVar[JobKeyMode | str | None] = None
    """Default ``job_key_mode`` (applies to jobs that have a key)."""
    TIMEOUT: ClassVar[_dt.timedelta | float | None] = None
    """Time limit of each job of this task (seconds or a ``timedelta``); it overrides the
    worker's ``job_timeout``. ``None``: the worker's."""

    def run(self, ctx: Any) -> Any:
        """Do the job's work; raising fails the job (it is retried with backoff).

        ``ctx`` is the job's :class:`~sqla_graphile.context.WorkerContext`.
        """
        raise NotImplementedError

    @classmethod
    def from_payload(cls: type[_T], data: Any) -> _T:
        """Decode a job payload into an instance of this task."""
        return decode_payload(cls, data)


class BatchTaskHandler:
    """Base class of batch tasks: one job carries a JSON array of items of this class.

    ``run_batch(items, ctx)`` returns ``None`` (all done) or a list with one entry per
    item, ``None`` for success or an exception for failure; the job is then retried with
    only the failed items as its payload.
    """

    IDENTIFIER: ClassVar[str]
    QUEUE_NAME: ClassVar[str | None] = None
    """Default ``queue_name`` of this task's batch jobs; see :class:`TaskHandler`."""
    MAX_ATTEMPTS: ClassVar[int | None] = None
    """Default ``max_attempts``."""
    PRIORITY: ClassVar[int | None] = None
    """Default ``priority``."""
    JOB_KEY: ClassVar[str | None] = None
    """Default ``job_key`` (keyed batch jobs accumulate their items)."""
    JOB_KEY_MODE: ClassVar[JobKeyMode | str | None] = None
    """Default ``job_key_mode``."""
    TIMEOUT: ClassVar[_dt.timedelta | float | None] = None
    """Time limit of each batch job (seconds or a ``timedelta``); ``None``: the worker's."""

    @classmethod
    def run_batch(cls: type[_B], items: list[_B], ctx: Any) -> Any:
        """Process the items; raising fails the whole batch.

        ``ctx`` is the job's :class:`~sqla_graphile.context.WorkerContext`.
        """
        raise NotImplementedError

    @classmethod
    def from_payload(cls: type[_T], data: Any) -> _T:
        """Decode one item of a batch payload."""
        return decode_payload(cls, data)


class FunctionTask(Generic[_T]):
    """A plain function ``fn(payload, ctx)`` registered as a task by :func:`task`.

    ``ctx`` is the job's :class:`~sqla_graphile.context.WorkerContext`.
    """

    def __init__(
        self,
        identifier: str,
        fn: Callable[[_T, Any], Any],
        payload_type: type[_T] | None = None,
        *,
        defaults: JobSpec | None = None,
        timeout: _dt.timedelta | float | None = None,
    ) -> None:
        self.IDENTIFIER = identifier
        self.fn = fn
        self.payload_type = payload_type
        self.defaults = _checked_defaults(defaults or DEFAULT_SPEC, f"task {identifier!r}")
        """The task's job defaults (fields left ``None`` have none)."""
        self.timeout = timeout_seconds(timeout, f"the timeout of task {identifier!r}")
        """The time limit of each job, in seconds (``None``: the worker's ``job_timeout``)."""
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", identifier)

    def job_spec(self, spec: JobSpec | None = None) -> JobSpec:
        """``spec`` with the fields it leaves unset taken from this task's defaults.

        A function task is added by identifier (``add_raw_job``), which applies no task's
        defaults: pass ``add_raw_job("name", payload, fn.job_spec(...))`` to apply them.
        """
        return _merge(spec, self.defaults) or DEFAULT_SPEC

    def decode(self, data: Any) -> Any:
        """Decode the payload for the function (typed when ``payload_type`` is given)."""
        return decode_payload(self.payload_type, data) if self.payload_type else data

    def __call__(self, payload: _T, ctx: Any) -> Any:
        """Call the function (the worker does this with the decoded payload)."""
        return self.fn(payload, ctx)

    def __repr__(self) -> str:
        return f"<task {self.IDENTIFIER!r} {self.__name__}>"


def task(
    identifier: str,
    *,
    payload_type: type[Any] | None = None,
    queue_name: str | None = None,
    max_attempts: int | None = None,
    priority: int | None = None,
    job_key: str | None = None,
    job_key_mode: JobKeyMode | str | None = None,
    timeout: _dt.timedelta | float | None = None,
) -> Callable[[Callable[[Any, Any], Any]], FunctionTask[Any]]:
    """Register a function ``fn(payload, ctx)`` (sync or async) as the task ``identifier``.

    ``payload_type`` (a dataclass or pydantic model) makes the worker decode the payload
    into that type; otherwise the function receives the JSON value.

    ``queue_name``, ``max_attempts``, ``priority``, ``job_key`` and ``job_key_mode`` are
    the task's job defaults (see :meth:`FunctionTask.job_spec`); ``timeout`` (seconds or
    a ``timedelta``) limits each job's run, overriding the worker's ``job_timeout``.
    Bad values raise here: :class:`~sqla_graphile.errors.InvalidJobSpec` for a default,
    ``ValueError`` for a timeout.
    """
    if not isinstance(identifier, str) or not identifier:
        raise InvalidArgument("a task identifier must be a non-empty string")
    # Checked now, so a bad option fails where the task is defined.
    checked = _defaults_spec(
        {
            "queue_name": queue_name,
            "max_attempts": max_attempts,
            "priority": priority,
            "job_key": job_key,
            "job_key_mode": job_key_mode,
        },
        f"task {identifier!r}",
    )
    seconds = timeout_seconds(timeout, f"the timeout of task {identifier!r}")

    def decorate(fn: Callable[[Any, Any], Any]) -> FunctionTask[Any]:
        return FunctionTask(identifier, fn, payload_type, defaults=checked, timeout=seconds)

    return decorate


# -- task defaults and time limits ------------------------------------------------------

#: The ``JobSpec`` fields a task may give defaults for, and their class attributes.
_DEFAULT_FIELDS = (
    ("queue_name", "QUEUE_NAME"),
    ("max_attempts", "MAX_ATTEMPTS"),
    ("priority", "PRIORITY"),
    ("job_key", "JOB_KEY"),
    ("job_key_mode", "JOB_KEY_MODE"),
)


def timeout_seconds(value: _dt.timedelta | float | None, what: str) -> float | None:
    """A time limit in seconds (``None`` stays ``None``); ``ValueError`` unless positive."""
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"{what} must be seconds or a timedelta, not {type(value).__name__}")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{what} must be a positive, finite time, not {seconds:g} s")
    return seconds


def _defaults_spec(values: dict[str, Any], owner: str) -> JobSpec:
    """The defaults of ``owner`` as a ``JobSpec``, checked as one (its key mode too)."""
    try:
        defaults = JobSpec(**values)
    except InvalidJobSpec as exc:
        raise type(exc)(f"the job defaults of {owner}: {exc}") from None
    return _checked_defaults(defaults, owner)


def _checked_defaults(defaults: JobSpec, owner: str) -> JobSpec:
    """``defaults`` with its key mode checked (the other fields ``JobSpec`` checks)."""
    mode = defaults.job_key_mode
    if mode is None or isinstance(mode, JobKeyMode):
        return defaults
    try:
        known = JobKeyMode(mode)
    except ValueError:
        modes = ", ".join(member.value for member in JobKeyMode)
        raise InvalidJobKeyMode(
            f"the job_key_mode default of {owner} must be one of {modes}, not {mode!r}"
        ) from None
    return dataclasses.replace(defaults, job_key_mode=known)


class _ClassOptions:
    """A task class's defaults and time limit, read from its class attributes once."""

    __slots__ = ("defaults", "timeout")

    def __init__(self, cls: type) -> None:
        owner = cls.__name__
        values = {field: getattr(cls, name, None) for field, name in _DEFAULT_FIELDS}
        defaults = _defaults_spec(values, owner)
        self.defaults = None if defaults == DEFAULT_SPEC else defaults
        self.timeout = timeout_seconds(getattr(cls, "TIMEOUT", None), f"{owner}.TIMEOUT")


_CLASS_OPTIONS: weakref.WeakKeyDictionary[type, _ClassOptions] = weakref.WeakKeyDictionary()


def _options(cls: type) -> _ClassOptions:
    options = _CLASS_OPTIONS.get(cls)
    if options is None:
        options = _CLASS_OPTIONS[cls] = _ClassOptions(cls)
    return options


def task_timeout(handler: Any) -> float | None:
    """The time limit, in seconds, of a task class or :class:`FunctionTask` (or ``None``)."""
    if isinstance(handler, FunctionTask):
        return handler.timeout
    return _options(handler if isinstance(handler, type) else type(handler)).timeout


def _merge(spec: JobSpec | None, defaults: JobSpec | None) -> JobSpec | None:
    """``spec`` with its unset fields taken from ``defaults`` (``spec`` itself if none)."""
    if defaults is None or defaults == DEFAULT_SPEC:
        return spec
    if spec is None or spec is DEFAULT_SPEC:
        return defaults
    changes = {
        field: getattr(defaults, field)
        for field, _ in _DEFAULT_FIELDS
        if getattr(spec, field) is None and getattr(defaults, field) is not None
    }
    return dataclasses.replace(spec, **changes) if changes else spec


def with_task_defaults(cls: type, spec: JobSpec | None) -> JobSpec | None:
    """``spec`` completed with the defaults of the task class ``cls``.

    Precedence: a field the ``spec`` sets, then the task's default, then (a field still
    ``None``) the database's default.
    """
    return _merge(spec, _options(cls).defaults)


def typed_jobs(jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> list[RawJobSpec]:
    """Typed tasks as raw jobs, each spec completed with its class's defaults.

    Jobs of one class sharing one spec object share one completed spec, so the batch
    still sees them as alike.
    """
    done: dict[tuple[type, int], tuple[JobSpec | None, JobSpec]] = {}
    raw: list[RawJobSpec] = []
    for instance, spec in jobs:
        cls = type(instance)
        key = (cls, id(spec))
        found = done.get(key)
        if found is None:
            # The spec is kept in the entry: its id stays its own while the entry lives.
            found = done[key] = (spec, with_task_defaults(cls, spec) or DEFAULT_SPEC)
        raw.append(RawJobSpec(identifier_of(instance), instance, found[1]))
    return raw


def batch_spec(items: Sequence[Any], spec: JobSpec | None) -> JobSpec | None:
    """The spec of a batch job of ``items``, completed with their class's defaults."""
    if not items or not isinstance(items[0], BatchTaskHandler):
        return spec  # refused by the add itself, with its own message
    return with_task_defaults(type(items[0]), spec)


def identifier_of(handler: Any) -> str:
    """The task identifier of a handler class, instance or :class:`FunctionTask`."""
    identifier = getattr(handler, "IDENTIFIER", None)
    if not isinstance(identifier, str) or not identifier:
        raise InvalidArgumentType(f"{handler!r} has no IDENTIFIER; typed tasks must define one")
    return identifier


def batch_payload(items: Sequence[Any]) -> list[Any]:
    """The JSON array stored for a batch job (items encoded one by one)."""
    return [to_json_value(item) for item in items]
