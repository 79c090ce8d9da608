"""Arguments of the job-management calls: misuse is named, with the call that was meant."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidArgumentType
from .specs import DEFAULT_SPEC, JobSpec, RawJobSpec, check_text
from .tasks import BatchTaskHandler, FunctionTask

__all__ = [
    "check_identifier",
    "check_raw_jobs",
    "check_spec",
    "iterable_of",
    "job_ids",
    "kind",
    "typed_identifier",
]


def kind(value: object) -> str:
    """The name of ``value``'s type, for messages."""
    return type(value).__name__


def typed_identifier(task: object, method: str = "add_job") -> str:
    """The identifier of a typed task instance given to ``method``; misuse is named.

    A task instance is its job's payload, so a string (an identifier), a class, a
    ``@task`` function or a batch item cannot stand for one: each gets
    :class:`~sqla_graphile.errors.InvalidArgumentType` naming the call that fits.
    """
    if isinstance(task, str):
        raise InvalidArgumentType(
            f"{method} takes a task instance (a TaskHandler), not the identifier {task!r}; "
            f"to add a job by identifier with a JSON payload use add_raw_job({task!r}, payload)"
        )
    if isinstance(task, FunctionTask):
        raise InvalidArgumentType(
            f"{method} takes a task instance; a @task function has no instance: use "
            f"add_raw_job({task.IDENTIFIER!r}, payload)"
        )
    if isinstance(task, BatchTaskHandler):
        raise InvalidArgumentType(
            f"{type(task).__name__} is a batch task: add its items with add_batch_job([...])"
        )
    if isinstance(task, type):
        raise InvalidArgumentType(
            f"{method} takes a task instance, not the class {task.__name__}: "
            f"{method}({task.__name__}(...))"
        )
    identifier = getattr(task, "IDENTIFIER", None)
    if not isinstance(identifier, str) or not identifier:
        raise InvalidArgumentType(
            f"{method} takes a task instance (a TaskHandler subclass with an IDENTIFIER), "
            f"not {kind(task)}; for a task identifier and a JSON payload use "
            "add_raw_job(identifier, payload)"
        )
    return check_text("the task identifier", identifier)


def check_spec(spec: object, method: str) -> JobSpec:
    """``spec`` if it is a ``JobSpec`` (``None``: the defaults); misuse is named."""
    if spec is None:
        return DEFAULT_SPEC
    if isinstance(spec, JobSpec):
        return spec
    hint = ""
    if isinstance(spec, Mapping):
        fields = ", ".join(f"{key}=..." for key in spec)
        hint = f": write JobSpec({fields})"
    raise InvalidArgumentType(f"{method} takes a JobSpec as its spec, not {kind(spec)}{hint}")


def check_identifier(identifier: object, method: str) -> str:
    """A task identifier given to ``method``; a typed task or other value is named."""
    if isinstance(identifier, str):
        return check_text("the task identifier", identifier)
    if getattr(identifier, "IDENTIFIER", None) is not None:
        raise InvalidArgumentType(
            f"{method} takes a task identifier (a string), not {kind(identifier)}; "
            "for a typed task use add_job(task)"
        )
    raise InvalidArgumentType(
        f"{method} takes a task identifier (a string), not {kind(identifier)}"
    )


def check_raw_jobs(jobs: object) -> list[RawJobSpec]:
    """The ``RawJobSpec`` items of ``add_raw_jobs``; misuse is named."""
    if isinstance(jobs, (str, bytes, Mapping, RawJobSpec)) or not isinstance(jobs, Iterable):
        raise InvalidArgumentType(f"add_raw_jobs takes a list of RawJobSpec, not {kind(jobs)}")
    listed = list(jobs)
    # Batches repeat one identifier and spec object: each is checked once.
    identifier: object = None
    spec: object = None
    for job in listed:
        if not isinstance(job, RawJobSpec):
            raise InvalidArgumentType(
                f"add_raw_jobs takes RawJobSpec items, not {kind(job)}: write "
                "RawJobSpec(identifier, payload, JobSpec(...)); for typed tasks use "
                "add_jobs([(task, spec), ...])"
            )
        if job.identifier is not identifier:
            identifier = check_identifier(job.identifier, "RawJobSpec")
        if job.spec is not spec:
            spec = check_spec(job.spec, "RawJobSpec")
    return listed


def iterable_of(value: object, what: str, method: str) -> Iterable[Any]:
    """``value`` if it is a list-like of ``what`` (never a string, bytes or mapping)."""
    # A string is iterable too: one worker id would become one id per character.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgumentType(f"{method} takes a list of {what}, not {kind(value)}")
    return value


def job_ids(values: object, method: str) -> list[int]:
    """The job ids given to ``method``, as integers."""
    ids = []
    for job_id in iterable_of(values, "job ids (e.g. [job.id])", method):
        try:
            ids.append(operator.index(job_id))
        except TypeError:
            raise InvalidArgumentType(
                f"{method} takes job ids (integers), not {kind(job_id)}"
            ) from None
    return ids
