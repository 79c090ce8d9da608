"""How the worker calls each kind of task, with one semantics for ``def`` and ``async def``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..context import WorkerContext
from ..cron import CRON_KEY, Cron
from ..errors import BatchJobError, CrontabError, InvalidArgument, InvalidArgumentType
from ..tasks import BatchTaskHandler, FunctionTask, TaskHandler, identifier_of, task_timeout

__all__ = ["BatchFailure", "BatchJobError", "TaskRegistry", "WorkerTask", "batch_outcome"]


@dataclass(frozen=True)
class BatchFailure:
    """Some items of a batch failed: the job is retried with only them as its payload."""

    message: str
    payload: list[Any] | None
    """The failed items (JSON), or ``None`` when every item failed (payload unchanged)."""


@dataclass(frozen=True)
class WorkerTask:
    """One registered task: how to call it, and whether it runs on the loop."""

    identifier: str
    invoke: Callable[[Any, WorkerContext], Any]
    """Decode the payload and call the handler; returns its result (or a coroutine)."""
    is_async: bool
    is_batch: bool
    decode: Callable[[Any], Any] | None = None
    """What the handler receives for a payload, for typed tasks (``None``: the JSON)."""
    timeout: float | None = None
    """The task's own time limit in seconds (``None``: the worker's ``job_timeout``)."""


def _without_cron(payload: Any) -> Any:
    """The payload minus the ``_cron`` stamp of a cron job, which typed payloads lack.

    The handler reads the stamp as ``ctx.cron``; the row keeps it, as Node wrote it.
    """
    if isinstance(payload, dict) and CRON_KEY in payload:
        payload = {key: value for key, value in payload.items() if key != CRON_KEY}
    return payload


def _task_handler(cls: type[TaskHandler]) -> WorkerTask:
    def decode(payload: Any) -> TaskHandler:
        return cls.from_payload(_without_cron(payload))

    def invoke(payload: Any, ctx: WorkerContext) -> Any:
        return decode(payload).run(ctx)

    is_async = inspect.iscoroutinefunction(cls.run)
    return WorkerTask(identifier_of(cls), invoke, is_async, False, decode, task_timeout(cls))


def _function_task(fn: FunctionTask[Any]) -> WorkerTask:
    is_async = inspect.iscoroutinefunction(fn.fn)
    if fn.payload_type is None:
        # Untyped: the JSON as stored, ``_cron`` included (as a Node handler sees it).
        def call(payload: Any, ctx: WorkerContext) -> Any:
            return fn.fn(payload, ctx)

        return WorkerTask(fn.IDENTIFIER, call, is_async, False, timeout=fn.timeout)

    def decode(payload: Any) -> Any:
        return fn.decode(_without_cron(payload))

    def invoke(payload: Any, ctx: WorkerContext) -> Any:
        return fn.fn(decode(payload), ctx)

    return WorkerTask(fn.IDENTIFIER, invoke, is_async, False, decode, fn.timeout)


def _batch_task(cls: type[BatchTaskHandler]) -> WorkerTask:
    def decode(payload: Any) -> list[BatchTaskHandler]:
        if not isinstance(payload, list):
            raise BatchJobError(
                f"batch job payload must be a JSON array, got {_json_kind(payload)}"
            )
        return [cls.from_payload(item) for item in payload]

    def invoke(payload: Any, ctx: WorkerContext) -> Any:
        return cls.run_batch(decode(payload), ctx)

    is_async = inspect.iscoroutinefunction(cls.run_batch)
    return WorkerTask(identifier_of(cls), invoke, is_async, True, decode, task_timeout(cls))


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return type(value).__name__


class TaskRegistry(dict[str, WorkerTask]):
    """The worker's tasks by identifier."""

    @classmethod
    def build(cls, tasks: Iterable[Any]) -> TaskRegistry:
        """Register ``TaskHandler``/``BatchTaskHandler`` subclasses and ``@task`` functions."""
        registry = cls()
        for handler in tasks:
            if isinstance(handler, FunctionTask):
                entry = _function_task(handler)
            elif isinstance(handler, type) and issubclass(handler, BatchTaskHandler):
                entry = _batch_task(handler)
            elif isinstance(handler, type) and issubclass(handler, TaskHandler):
                entry = _task_handler(handler)
            else:
                raise InvalidArgumentType(
                    f"{handler!r} is not a task: pass TaskHandler or BatchTaskHandler "
                    "subclasses, or functions decorated with @task"
                )
            if entry.identifier in registry:
                raise InvalidArgument(f"two tasks share the identifier {entry.identifier!r}")
            if len(entry.identifier) > 128:
                raise InvalidArgument(
                    f"task identifier {entry.identifier[:20]!r}… is longer than 128 characters"
                )
            registry[entry.identifier] = entry
        if not registry:
            raise InvalidArgument("a worker needs at least one task")
        return registry

    def check_crontab(self, items: Iterable[Cron]) -> None:
        """Refuse cron items whose jobs one of these typed tasks could never decode.

        A cron item's payload never changes, so a payload its task cannot decode would
        fail the item's job every time it runs. Raises :class:`CrontabError` naming the
        item (its line), the task and the decoding error. Items of tasks not registered
        here (a Node worker's, say) and untyped tasks are not checked.
        """
        for item in items:
            entry = self.get(item.task)
            if entry is None or entry.decode is None:
                continue
            # The payload of a job the item would add, decoded as the worker would.
            payload = item.job_payload(_SAMPLE_MINUTE)
            try:
                entry.decode(payload)
            except Exception as exc:
                where = (
                    f"line {item.line} of crontab"
                    if item.line is not None
                    else f"cron item {item.identifier!r}"
                )
                kind = "batch task" if entry.is_batch else "typed task"
                raise CrontabError(
                    f"{where}, payload: the {kind} {item.task!r} cannot decode the item's "
                    f"payload {item.payload!r}, so every job of it would fail: "
                    f"{type(exc).__name__}: {exc}",
                    line=item.line,
                    field="payload",
                ) from exc


_SAMPLE_MINUTE = datetime(2000, 1, 1, tzinfo=timezone.utc)


def batch_outcome(items: Sequence[Any], result: Any) -> BatchFailure | None:
    """Interpret what ``run_batch`` returned for the JSON ``items``.

    ``None`` means every item succeeded. A list holds one entry per item: an exception
    for a failed item, anything else for success. Other answers fail the whole job.
    """
    if result is None:
        return None
    if not isinstance(result, (list, tuple)):
        raise BatchJobError(
            "run_batch must return None or a list with one result per item, "
            f"not {type(result).__name__}"
        )
    if len(result) != len(items):
        raise BatchJobError(
            f"batch handler returned {len(result)} results for {len(items)} payload items"
        )
    failed = [(index, outcome) for index, outcome in enumerate(result) if _is_failure(outcome)]
    if not failed:
        return None
    details = ", ".join(f"{index}: {_item_error(outcome)}" for index, outcome in failed)
    message = f"{len(failed)} batch item(s) failed: {details}"
    if len(failed) == len(items):
        return BatchFailure(message, None)
    return BatchFailure(message, [items[index] for index, _ in failed])


def _is_failure(outcome: Any) -> bool:
    return isinstance(outcome, BaseException)


def _item_error(error: BaseException) -> str:
    return str(error) or type(error).__name__
