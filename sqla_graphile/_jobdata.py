"""How jobs travel to the statements and back: the JSON sent, the rows read as Jobs.

The name cache lets unkeyed jobs of known tasks and queues skip the SQL functions (the
fast path of :mod:`sqla_graphile._ops`); the helpers here build what those statements
take and turn what they return into :class:`~sqla_graphile.job.Job` objects.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.engine import Result

from .codec import encode_json_value
from .job import Job
from .specs import JobSpec, RawJobSpec

if TYPE_CHECKING:
    from ._drive import Request
    from .sql import AddingStatements

__all__ = [
    "NameCache",
    "Targets",
    "dict_rows",
    "flags_json",
    "in_input_order",
    "insert_request",
    "inserted_job",
    "one_row",
    "options_json",
    "pairs",
    "plain_options",
    "single_hint",
    "spec_params",
    "spec_tail",
]


@dataclass
class NameCache:
    """Task and queue names by id, and ids by name.

    Ids are identity values, never reused, so a name once known for an id stays right
    for the life of the database. The other way round, a name's id can go stale (its row
    deleted by a cleanup, or its insert rolled back): the statements that use an id from
    here check it against its name and report when it is gone.
    """

    tasks: dict[int, str] = field(default_factory=dict)
    queues: dict[int, str] = field(default_factory=dict)
    task_ids: dict[str, int] = field(default_factory=dict)
    queue_ids: dict[str, int] = field(default_factory=dict)

    def learn_task(self, task_id: int, identifier: str) -> None:
        """Remember a task row's id and identifier."""
        self.tasks[task_id] = identifier
        self.task_ids[identifier] = task_id

    def learn_queue(self, queue_id: int, queue_name: str) -> None:
        """Remember a queue row's id and name."""
        self.queues[queue_id] = queue_name
        self.queue_ids[queue_name] = queue_id

    def forget(self, identifier: str, queue_name: str | None) -> None:
        """Drop the ids of a name whose row turned out to be gone."""
        self.task_ids.pop(identifier, None)
        if queue_name is not None:
            self.queue_ids.pop(queue_name, None)


def spec_params(identifier: str, payload_json: str, spec: JobSpec) -> dict[str, Any]:
    """The parameters of the ``add_job`` statement for one job."""
    return {
        "identifier": identifier,
        "payload": payload_json,
        "queue_name": spec.queue_name,
        "run_at": spec.run_at,
        "max_attempts": spec.max_attempts,
        "job_key": spec.job_key,
        "priority": spec.priority,
        "flags": list(spec.flags) if spec.flags is not None else None,
        "job_key_mode": spec.key_mode,
    }


class Targets(NamedTuple):
    """The distinct (task, queue) pairs of a fast-path batch."""

    numbers: list[int]  # per job, its pair's number
    ids: list[tuple[int, int | None]]  # per number, the cached task and queue ids
    described: str  # the pairs with their names, as JSON, for the insert's check
    options: str  # per job, its pair's number and options, as a JSON array
    uniform: RawJobSpec | None  # the first job, when all share one pair and one set of options


def insert_request(
    sql: AddingStatements, targets: Targets, document: str, counted: bool
) -> Request:
    """The fast path's statement for a batch and its parameters.

    A batch whose jobs share one target and one set of options sends them as plain
    parameters, and only the payloads as an array.
    """
    like = targets.uniform
    params: dict[str, Any]
    if like is None:
        params = {"targets": targets.described, "payloads": document, "jobs": targets.options}
        return (sql.insert_jobs_counted if counted else sql.insert_jobs), params
    spec = like.spec
    task_id, queue_id = targets.ids[0]
    params = {
        "task_id": task_id,
        "identifier": like.identifier,
        "queue_id": queue_id,
        "queue_name": spec.queue_name,
        "priority": spec.priority,
        "run_at": spec.run_at,
        "max_attempts": spec.max_attempts,
        "flags": flags_json(spec.flags),
        "payloads": document,
    }
    return (sql.insert_uniform_jobs_counted if counted else sql.insert_uniform_jobs), params


def single_hint(rows: Sequence[Mapping[Any, Any]], key: str, names: set[Any]) -> dict[int, str]:
    """When every row came from specs naming one value, its id maps to that value."""
    values = {name for name in names if name is not None}
    ids = {row[key] for row in rows if row[key] is not None}
    if len(values) == 1 and len(ids) == 1:
        return {ids.pop(): values.pop()}
    return {}


def plain_options(spec: JobSpec) -> bool:
    """Whether the fast path stores these options exactly as the SQL functions would."""
    priority, max_attempts, flags = spec.priority, spec.max_attempts, spec.flags
    return (
        (priority is None or type(priority) is int)
        and (max_attempts is None or type(max_attempts) is int)
        and (flags is None or all(type(flag) is str and "\x00" not in flag for flag in flags))
    )


def flags_json(flags: Sequence[str] | None) -> str | None:
    """The ``flags`` column's value, as ``add_jobs`` builds it: ``{flag: true}`` or NULL."""
    if not flags:
        return None
    return encode_json_value(dict.fromkeys(flags, True))


def options_json(spec: JobSpec) -> str:
    """The options of a fast-path batch element, as JSON members (``""`` for none)."""
    if (
        spec.priority is None
        and spec.run_at is None
        and spec.max_attempts is None
        and spec.flags is None
    ):
        return ""
    members = ""
    if spec.priority is not None:
        members += f',"pr":{spec.priority}'
    if spec.run_at is not None:
        members += f',"ra":"{spec.run_at.isoformat()}"'
    if spec.max_attempts is not None:
        members += f',"ma":{spec.max_attempts}'
    flags = flags_json(spec.flags)
    if flags is not None:
        members += f',"f":{flags}'
    return members


def inserted_job(
    job_id: int,
    run_at: datetime,
    created_at: datetime,
    identifier: str,
    spec: JobSpec,
    payload: Any,
    task_id: int,
    queue_id: int | None,
) -> Job:
    """The ``Job`` of a fast-path insert: the database's id and times, the rest as sent."""
    priority, max_attempts, flags = spec.priority, spec.max_attempts, spec.flags
    # Positional, in field order: id, queue_name, task_identifier, payload, priority,
    # run_at, attempts, max_attempts, last_error, created_at, updated_at (both now()),
    # key, locked_at, locked_by, revision, flags, task_id, job_queue_id.
    return Job(
        job_id,
        spec.queue_name,
        identifier,
        payload,
        0 if priority is None else priority,
        run_at,
        0,
        25 if max_attempts is None else max_attempts,
        None,
        created_at,
        created_at,
        None,
        None,
        None,
        0,
        frozenset(flags) if flags else None,
        task_id,
        queue_id,
    )


def in_input_order(
    prepared: Sequence[RawJobSpec], texts: Sequence[str], jobs: list[Job], stored: list[str]
) -> list[Job]:
    """``jobs`` (rows of one ``add_jobs`` call) reordered to match ``prepared``.

    SQL returns the rows in no particular order. A keyed row belongs to the spec of its
    key (keys are unique in a batch); an unkeyed row to a spec with the same task, queue,
    stored payload text and options. Specs alike in all of these get rows alike in all
    but their ids, taken in id order.
    """
    placed: list[Job | None] = [None] * len(prepared)
    by_key: dict[str, int] = {}
    alike: dict[tuple[Any, ...], deque[int]] = {}
    # Unkeyed rows are all inserted, at the statement's now(): their run_at when unset.
    now = next((job.created_at for job in jobs if job.key is None), None)
    for i, job in enumerate(prepared):
        spec = job.spec
        if spec.job_key is not None:
            by_key[spec.job_key] = i
            continue
        signature = (
            job.identifier,
            spec.queue_name,
            texts[i],
            0 if spec.priority is None else spec.priority,
            25 if spec.max_attempts is None else spec.max_attempts,
            frozenset(spec.flags) if spec.flags else None,
            now if spec.run_at is None else spec.run_at,
        )
        alike.setdefault(signature, deque()).append(i)
    unmatched: list[Job] = []
    for j in sorted(range(len(jobs)), key=lambda j: jobs[j].id):
        row = jobs[j]
        if row.key is not None and row.key in by_key:
            placed[by_key.pop(row.key)] = row
            continue
        signature = (
            row.task_identifier,
            row.queue_name,
            stored[j],
            row.priority,
            row.max_attempts,
            row.flags,
            row.run_at,
        )
        waiting = alike.get(signature)
        if waiting:
            placed[waiting.popleft()] = row
        else:
            unmatched.append(row)
    # Defensive: a row no spec claims (it cannot happen with the functions of this
    # schema) takes the first free place rather than being lost.
    free = (i for i, job in enumerate(placed) if job is None)
    for row in unmatched:
        placed[next(free)] = row
    return [job for job in placed if job is not None]


def spec_tail(identifier: str, spec: JobSpec) -> str:
    """A ``job_spec`` JSON object without its opening brace and payload.

    The payload, already JSON text, is put in front of it as is. Fields left ``None``
    are omitted: ``json_populate_recordset`` reads them as NULL, as an explicit ``null``.
    """
    fields: dict[str, Any] = {"identifier": identifier}
    if spec.queue_name is not None:
        fields["queue_name"] = spec.queue_name
    if spec.run_at is not None:
        fields["run_at"] = spec.run_at.isoformat()
    if spec.max_attempts is not None:
        fields["max_attempts"] = spec.max_attempts
    if spec.job_key is not None:
        fields["job_key"] = spec.job_key
    if spec.priority is not None:
        fields["priority"] = spec.priority
    if spec.flags is not None:
        fields["flags"] = list(spec.flags)
    return json.dumps(fields)[1:]


def pairs(result: Result[Any]) -> list[tuple[Any, Any]]:
    """The rows of a two-column result as plain tuples."""
    rows: list[Sequence[Any]] = list(result.all())
    return [(row[0], row[1]) for row in rows]


def one_row(result: Result[Any]) -> dict[str, Any]:
    """The single row of ``result`` as a plain dict (``Result.one()`` semantics)."""
    return dict(zip(result.keys(), result.one(), strict=True))


def dict_rows(result: Result[Any]) -> list[dict[str, Any]]:
    """The rows of ``result`` as plain dicts (cheaper to read than ``RowMapping``)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result.all()]
