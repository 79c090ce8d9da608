"""Every job-management operation, written once for both the sync and asyncio faces.

An operation is a generator: it yields ``(statement, parameters)`` requests, receives each
statement's :class:`~sqlalchemy.engine.Result`, and returns its value. ``WorkerUtils``
drives it with ``connection.execute``, ``AsyncWorkerUtils`` with
``await connection.execute``; neither face holds any SQL or logic of its own.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    Executable,
    Integer,
    Text,
    bindparam,
    column,
    delete,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.engine import Result
from sqlalchemy.sql.functions import Function

from .errors import GraphileWorkerError, JobScheduleFailed
from .functions import WorkerFunctions, worker_functions
from .hooks import Hooks
from .job import Job
from .schema import WorkerSchema, worker_schema
from .specs import CleanupTask, JobKeyMode, JobSpec, RawJobSpec, RescheduleJobOptions
from .tasks import batch_payload, encode_payload, identifier_of, to_json_value

__all__ = ["ANALYZE_THRESHOLD", "KEY_RACE_RETRIES", "Op", "Operations", "Request"]

_T = TypeVar("_T")
Request = tuple[Executable, Mapping[Any, Any]]
Op = Generator[Request, Result[Any], _T]

#: After inserting this many jobs in one call the jobs table is analysed.
ANALYZE_THRESHOLD = 10_000
#: How often a keyed add that lost a race (Node issue #580) is retried.
KEY_RACE_RETRIES = 10

_TIMESTAMPTZ = DateTime(timezone=True)


class _Statements:
    """The prepared statements of one worker schema (built once, cached per schema)."""

    def __init__(self, schema: WorkerSchema, fn: WorkerFunctions) -> None:
        self.schema = schema
        jobs = schema.private_jobs
        # Result columns carry the table's types, so every driver decodes JSON and
        # timestamps the same way.
        self.row_columns = [column(c.name, c.type) for c in jobs.columns]

        def rows(call: Function[Any]) -> Executable:
            alias = call.table_valued(*self.row_columns, name="job")
            return select(*alias.c).select_from(alias)

        self.add_job = rows(
            fn.add_job(
                bindparam("identifier", type_=Text),
                bindparam("payload", type_=Text),
                queue_name=bindparam("queue_name", type_=Text),
                run_at=bindparam("run_at", type_=_TIMESTAMPTZ),
                max_attempts=bindparam("max_attempts", type_=Integer),
                job_key=bindparam("job_key", type_=Text),
                priority=bindparam("priority", type_=Integer),
                flags=bindparam("flags", type_=ARRAY(Text)),
                job_key_mode=bindparam("job_key_mode", type_=Text),
            )
        )
        self.add_jobs = rows(
            fn.add_jobs(
                fn.specs_from_json(bindparam("specs", type_=Text)),
                bindparam("preserve_run_at", type_=Boolean),
            )
        )
        self.remove_job = rows(fn.remove_job(bindparam("job_key", type_=Text)))
        ids = bindparam("ids", type_=ARRAY(BigInteger))
        self.complete_jobs = rows(fn.complete_jobs(ids))
        self.permanently_fail_jobs = rows(
            fn.permanently_fail_jobs(ids, bindparam("reason", type_=Text))
        )
        self.reschedule_jobs = rows(
            fn.reschedule_jobs(
                ids,
                # Without a run_at the jobs become runnable now, by the database's clock.
                run_at=func.coalesce(bindparam("run_at", type_=_TIMESTAMPTZ), func.now()),
                priority=bindparam("priority", type_=Integer),
                attempts=bindparam("attempts", type_=Integer),
                max_attempts=bindparam("max_attempts", type_=Integer),
            )
        )
        self.force_unlock_workers = select(
            fn.force_unlock_workers(bindparam("worker_ids", type_=ARRAY(Text)))
        )
        tasks, queues = schema.private_tasks, schema.private_job_queues
        self.task_names = select(tasks.c.id, tasks.c.identifier).where(
            tasks.c.id == func.any(bindparam("ids", type_=ARRAY(Integer)))
        )
        self.queue_names = select(queues.c.id, queues.c.queue_name).where(
            queues.c.id == func.any(bindparam("ids", type_=ARRAY(Integer)))
        )
        self.analyze = text(f"analyze {schema.quoted_name}._private_jobs")
        self.delete_permanently_failed = delete(jobs).where(
            jobs.c.attempts >= jobs.c.max_attempts, jobs.c.locked_at.is_(None)
        )
        self.gc_task_identifiers = delete(tasks).where(
            ~exists().where(jobs.c.task_id == tasks.c.id),
            tasks.c.identifier != func.all(bindparam("keep", type_=ARRAY(Text))),
        )
        # NOT EXISTS, not NOT IN: jobs without a queue have a NULL job_queue_id, and
        # NOT IN over a NULL would keep every queue forever.
        self.gc_job_queues = delete(queues).where(
            queues.c.locked_at.is_(None),
            ~exists().where(jobs.c.job_queue_id == queues.c.id),
        )
        self.register_tasks = text(
            f"insert into {schema.quoted_name}._private_tasks (identifier) "
            "select unnest(cast(:names as text[])) on conflict do nothing"
        ).bindparams(bindparam("names", type_=ARRAY(Text)))


@functools.lru_cache(maxsize=64)
def statements(schema: str) -> _Statements:
    """The statements of the worker schema called ``schema``."""
    return _Statements(worker_schema(schema), worker_functions(schema))


@dataclass
class NameCache:
    """Task and queue names by id.

    Ids are identity values, never reused, so a name once known for an id stays right
    for the life of the database.
    """

    tasks: dict[int, str] = field(default_factory=dict)
    queues: dict[int, str] = field(default_factory=dict)


def _spec_params(identifier: str, payload_json: str, spec: JobSpec) -> dict[str, Any]:
    if not isinstance(identifier, str):
        raise TypeError("a task identifier must be a string")
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


def _ids(job_ids: Iterable[int]) -> list[int]:
    return [int(job_id) for job_id in job_ids]


class Operations:
    """The operations of one utils object: its schema, hooks, name cache, known tasks."""

    def __init__(
        self,
        schema: str,
        hooks: Hooks | None,
        names: NameCache,
        known_identifiers: Collection[str] = (),
    ) -> None:
        self.schema = schema
        self.sql = statements(schema)
        self.hooks = hooks
        self.names = names
        self.known_identifiers = known_identifiers

    # -- payloads and hooks -------------------------------------------------------

    def _prepare(self, identifier: str, payload: Any, spec: JobSpec) -> str:
        """Run the schedule hooks, then encode; both happen before any write."""
        value = to_json_value(payload)
        if self.hooks:
            value = self.hooks.schedule(identifier, value, spec)
        return encode_payload(value)

    # -- reading rows back as Jobs ------------------------------------------------

    def _jobs(
        self,
        rows: Sequence[Mapping[Any, Any]],
        task_hint: Mapping[int, str] | None = None,
        queue_hint: Mapping[int, str] | None = None,
    ) -> Op[list[Job]]:
        if task_hint:
            self.names.tasks.update(task_hint)
        if queue_hint:
            self.names.queues.update(queue_hint)
        missing_tasks = {r["task_id"] for r in rows} - self.names.tasks.keys()
        if missing_tasks:
            result = yield self.sql.task_names, {"ids": sorted(missing_tasks)}
            self.names.tasks.update({m["id"]: m["identifier"] for m in result.mappings()})
        queue_ids = {r["job_queue_id"] for r in rows if r["job_queue_id"] is not None}
        missing_queues = queue_ids - self.names.queues.keys()
        if missing_queues:
            result = yield self.sql.queue_names, {"ids": sorted(missing_queues)}
            self.names.queues.update({m["id"]: m["queue_name"] for m in result.mappings()})
        return [
            Job.from_row(
                row,
                # A task row deleted meanwhile (GC) leaves the name unknown: "".
                task_identifier=self.names.tasks.get(row["task_id"], ""),
                queue_name=(
                    self.names.queues.get(row["job_queue_id"])
                    if row["job_queue_id"] is not None
                    else None
                ),
            )
            for row in rows
        ]

    @staticmethod
    def _single_hint(
        rows: Sequence[Mapping[Any, Any]], key: str, names: set[Any]
    ) -> dict[int, str]:
        """When every row came from specs naming one value, its id maps to that value."""
        values = {name for name in names if name is not None}
        ids = {row[key] for row in rows if row[key] is not None}
        if len(values) == 1 and len(ids) == 1:
            return {ids.pop(): values.pop()}
        return {}

    # -- adding jobs --------------------------------------------------------------

    def add_job(self, identifier: str, payload: Any, spec: JobSpec | None) -> Op[Job]:
        spec = spec or JobSpec()
        payload_json = self._prepare(identifier, payload, spec)
        return (yield from self._insert_one(identifier, payload_json, spec))

    def add_batch_job(self, items: Sequence[Any], spec: JobSpec | None) -> Op[Job]:
        if not items:
            raise JobScheduleFailed("a batch job payload must contain at least one item")
        identifiers = {identifier_of(type(item)) for item in items}
        if len(identifiers) != 1:
            raise TypeError("all items of a batch job must be of one BatchTaskHandler class")
        (identifier,) = identifiers
        spec = spec or JobSpec()
        payload = batch_payload(items)
        if self.hooks:
            payload = self.hooks.schedule(identifier, payload, spec)
            if not isinstance(payload, list):
                raise JobScheduleFailed(
                    "a before_job_schedule hook must return a JSON array for batch jobs"
                )
            if not payload:
                raise JobScheduleFailed("a batch job payload must contain at least one item")
        return (yield from self._insert_one(identifier, encode_payload(payload), spec))

    def _insert_one(self, identifier: str, payload_json: str, spec: JobSpec) -> Op[Job]:
        params = _spec_params(identifier, payload_json, spec)
        for _ in range(KEY_RACE_RETRIES):
            result = yield self.sql.add_job, params
            row = _one_row(result)
            if row["id"] is not None:
                break
            # Node issue #580: the keyed job was locked between add_jobs' detach step
            # and its upsert, so nothing was written. Trying again detaches it properly.
        else:
            raise GraphileWorkerError(
                f"could not add job {identifier!r} with key {spec.job_key!r}: the keyed job "
                f"was locked by a worker in each of {KEY_RACE_RETRIES} attempts"
            )
        task_hint: dict[int, str] = {}
        queue_hint: dict[int, str] = {}
        if spec.key_mode != JobKeyMode.UNSAFE_DEDUPE.value or row["revision"] == 0:
            # The row was inserted or overwritten from this spec: its ids are ours.
            task_hint[row["task_id"]] = identifier
            if row["job_queue_id"] is not None and spec.queue_name is not None:
                queue_hint[row["job_queue_id"]] = spec.queue_name
        jobs = yield from self._jobs([row], task_hint, queue_hint)
        return jobs[0]

    def add_jobs(self, jobs: Sequence[RawJobSpec]) -> Op[list[Job]]:
        if not jobs:
            return []
        modes = {job.spec.key_mode for job in jobs}
        if JobKeyMode.UNSAFE_DEDUPE.value in modes:
            raise JobScheduleFailed(
                "UNSAFE_DEDUPE job_key_mode is not supported in batch add_jobs; "
                "add such jobs one at a time with add_job"
            )
        preserve = JobKeyMode.PRESERVE_RUN_AT.value in modes
        # Each spec is encoded once (hooks and payload encoding run for every job before
        # anything is written); a retry resends only the pending ones.
        encoded: list[str] = []
        keys: list[str | None] = []
        identifiers: set[Any] = set()
        queue_names: set[Any] = set()
        plain_tails: dict[str, str] = {}  # per identifier, for specs setting no option
        for job in jobs:
            spec = job.spec
            payload_json = self._prepare(job.identifier, job.payload, spec)
            if (
                spec.queue_name is None
                and spec.run_at is None
                and spec.max_attempts is None
                and spec.job_key is None
                and spec.priority is None
                and spec.flags is None
            ):
                tail = plain_tails.get(job.identifier)
                if tail is None:
                    tail = plain_tails[job.identifier] = _spec_tail(job.identifier, spec)
            else:
                tail = _spec_tail(job.identifier, spec)
            encoded.append('{"payload":' + payload_json + "," + tail)
            keys.append(spec.job_key)
            identifiers.add(job.identifier)
            queue_names.add(spec.queue_name)
        rows: list[Mapping[str, Any]] = []
        pending: Sequence[int] = range(len(encoded))
        for _ in range(KEY_RACE_RETRIES):
            result = yield (
                self.sql.add_jobs,
                {
                    "specs": "[" + ",".join([encoded[i] for i in pending]) + "]",
                    "preserve_run_at": preserve,
                },
            )
            got = _dict_rows(result)
            rows.extend(got)
            if len(got) == len(pending):
                break
            # Keyed specs that lost the race with a worker locking their job (see add_job)
            # returned no row; only they are sent again.
            written = {row["key"] for row in got}
            pending = [i for i in pending if keys[i] is not None and keys[i] not in written]
            if not pending:
                break
        else:
            raise GraphileWorkerError(
                f"could not add {len(pending)} keyed job(s): their keyed jobs were locked by "
                f"workers in each of {KEY_RACE_RETRIES} attempts"
            )
        if len(jobs) >= ANALYZE_THRESHOLD:
            yield self.sql.analyze, {}
        task_hint = self._single_hint(rows, "task_id", identifiers)
        queue_hint = self._single_hint(rows, "job_queue_id", queue_names)
        return (yield from self._jobs(rows, task_hint, queue_hint))

    # -- administration -----------------------------------------------------------

    def remove_job(self, job_key: str) -> Op[Job | None]:
        result = yield self.sql.remove_job, {"job_key": job_key}
        row = _one_row(result)
        if row["id"] is None:
            return None
        jobs = yield from self._jobs([row])
        return jobs[0]

    def _rows(self, statement: Executable, params: Mapping[str, Any]) -> Op[list[Job]]:
        result = yield statement, params
        return (yield from self._jobs(_dict_rows(result)))

    def complete_jobs(self, ids: Iterable[int]) -> Op[list[Job]]:
        return self._rows(self.sql.complete_jobs, {"ids": _ids(ids)})

    def permanently_fail_jobs(self, ids: Iterable[int], reason: str | None) -> Op[list[Job]]:
        return self._rows(self.sql.permanently_fail_jobs, {"ids": _ids(ids), "reason": reason})

    def reschedule_jobs(self, ids: Iterable[int], options: RescheduleJobOptions) -> Op[list[Job]]:
        run_at = options.run_at
        if isinstance(run_at, timedelta):
            run_at = datetime.now().astimezone() + run_at
        elif run_at is not None and run_at.tzinfo is None:
            raise ValueError("RescheduleJobOptions.run_at must be timezone-aware")
        params = {
            "ids": _ids(ids),
            "run_at": run_at,
            "priority": options.priority,
            "attempts": options.attempts,
            "max_attempts": options.max_attempts,
        }
        return self._rows(self.sql.reschedule_jobs, params)

    def force_unlock_workers(self, worker_ids: Iterable[str]) -> Op[None]:
        ids = [str(worker_id) for worker_id in worker_ids]
        if ids:
            yield self.sql.force_unlock_workers, {"worker_ids": ids}

    def cleanup(self, tasks: Iterable[CleanupTask | str] | None) -> Op[None]:
        chosen = (
            [CleanupTask.GC_TASK_IDENTIFIERS, CleanupTask.GC_JOB_QUEUES]
            if tasks is None
            else [CleanupTask(task) for task in tasks]
        )
        keep = sorted(self.known_identifiers)
        for task in chosen:
            if task is CleanupTask.DELETE_PERMANENTLY_FAILED_JOBS:
                yield self.sql.delete_permanently_failed, {}
            elif task is CleanupTask.GC_TASK_IDENTIFIERS:
                yield self.sql.gc_task_identifiers, {"keep": keep}
                if keep:
                    # Workers of ours fetch by name, but Node workers cache task ids:
                    # make sure every known identifier still has its row.
                    yield self.sql.register_tasks, {"names": keep}
            else:
                yield self.sql.gc_job_queues, {}


def _spec_tail(identifier: str, spec: JobSpec) -> str:
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


def _one_row(result: Result[Any]) -> dict[str, Any]:
    """The single row of ``result`` as a plain dict (``Result.one()`` semantics)."""
    return dict(zip(result.keys(), result.one(), strict=True))


def _dict_rows(result: Result[Any]) -> list[dict[str, Any]]:
    """The rows of ``result`` as plain dicts (cheaper to read than ``RowMapping``)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result.all()]
