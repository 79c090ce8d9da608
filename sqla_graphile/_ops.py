"""Every job-management operation, written once for both the sync and asyncio faces.

An operation is a generator: it yields ``(statement, parameters)`` requests, receives each
statement's :class:`~sqlalchemy.engine.Result`, and returns its value. ``WorkerUtils``
drives it with ``connection.execute``, ``AsyncWorkerUtils`` with
``await connection.execute``; neither face holds any SQL or logic of its own.
"""

from __future__ import annotations

import functools
import json
import operator
from collections import deque
from collections.abc import Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    Executable,
    Integer,
    Select,
    SmallInteger,
    Text,
    and_,
    bindparam,
    cast,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Result
from sqlalchemy.sql.functions import Function

from .codec import (
    encode_json_value,
    encode_json_values,
    encode_payload,
    to_json_value,
    to_json_values,
)
from .errors import (
    InvalidArgument,
    InvalidArgumentType,
    InvalidHookResult,
    JobKeyLocked,
    ValueOutOfRange,
)
from .functions import WorkerFunctions, worker_functions
from .hooks import Hooks
from .job import Job
from .schema import WorkerSchema, literal_sql, worker_schema
from .specs import (
    DEFAULT_SPEC,
    CleanupTask,
    JobKeyMode,
    JobSpec,
    RawJobSpec,
    RescheduleJobOptions,
    check_run_at,
    check_text,
)
from .tasks import BatchTaskHandler, FunctionTask, batch_payload, identifier_of

__all__ = [
    "ANALYZE_THRESHOLD",
    "KEY_RACE_RETRIES",
    "Op",
    "Operations",
    "Request",
    "check_raw_jobs",
    "check_spec",
    "typed_identifier",
]

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
        # add_jobs' payloads as the stored text: the rows are matched back to their specs
        # by it, and decoded once.
        calls = fn.add_jobs(
            fn.specs_from_json(bindparam("specs", type_=Text)),
            bindparam("preserve_run_at", type_=Boolean),
        ).table_valued(*self.row_columns, name="job")
        self.add_jobs_text = select(
            *(cast(c, Text).label(c.name) if c.name == "payload" else c for c in calls.c)
        ).select_from(calls)
        # The fast path of unkeyed jobs whose task (and queue) ids are known.
        self.insert_job = _insert_one(schema, queued=False)
        self.insert_queued_job = _insert_one(schema, queued=True)
        self.insert_jobs = _insert_many(schema)
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
        self.now = select(func.now())
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
        self.analyze = literal_sql(f"analyze {schema.quoted_name}._private_jobs")
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


_JOB_COLUMNS = ("job_queue_id", "task_id", "payload", "priority", "run_at", "max_attempts", "flags")


def _notification(count: Any) -> Any:
    """Node's ``jobs:insert`` notification for ``count`` new jobs, delivered at commit."""
    message = (
        literal('{"r":', Text)
        + cast(func.random(), Text)
        + literal(',"count":', Text)
        + cast(count, Text)
        + literal("}", Text)
    )
    return func.pg_notify(literal("jobs:insert", Text), message).label("notified")


def _insert_one(schema: WorkerSchema, *, queued: bool) -> Select[Any]:
    """Insert one unkeyed job as ``add_jobs`` would, given its task (and queue) id.

    The ids come from a cache; joining them with their names guards against a row that
    was deleted (task GC) or never committed: then nothing is inserted or notified.
    """
    jobs, tasks, queues = schema.private_jobs, schema.private_tasks, schema.private_job_queues
    source: Any = tasks
    queue_id: Any = cast(null(), Integer)
    if queued:
        source = tasks.join(
            queues,
            and_(
                queues.c.id == bindparam("queue_id", type_=Integer),
                queues.c.queue_name == bindparam("queue_name", type_=Text),
            ),
        )
        queue_id = queues.c.id
    values = (
        select(
            queue_id,
            tasks.c.id,
            cast(bindparam("payload", type_=Text), postgresql.JSON),
            func.coalesce(cast(bindparam("priority", type_=Integer), SmallInteger), 0),
            func.coalesce(bindparam("run_at", type_=_TIMESTAMPTZ), func.now()),
            func.coalesce(cast(bindparam("max_attempts", type_=Integer), SmallInteger), 25),
            cast(bindparam("flags", type_=Text), postgresql.JSONB),
        )
        .select_from(source)
        .where(
            tasks.c.id == bindparam("task_id", type_=Integer),
            tasks.c.identifier == bindparam("identifier", type_=Text),
        )
    )
    added = (
        insert(jobs)
        .from_select(_JOB_COLUMNS, values)
        .returning(jobs.c.id, jobs.c.run_at, jobs.c.created_at)
        .cte("added")
    )
    # At most one row: it notifies (count 1) only when it was inserted.
    return select(
        added.c.id, added.c.run_at, added.c.created_at, _notification(literal(1, Integer))
    ).select_from(added)


def _insert_many(schema: WorkerSchema) -> Select[Any]:
    """Insert many unkeyed jobs as ``add_jobs`` would, given their task and queue ids.

    ``targets`` is a JSON array of ``{k, t, i, q, qn}``: a number, a task id and its
    identifier, a queue id and its name (or nulls). ``payloads`` is the JSON array of the
    jobs' payloads, ``jobs`` the JSON array of their ``{k, pr, ra, ma, f}``: target
    number, priority, run_at, max_attempts, flags object (absent fields are NULL); the
    two are matched by position. Each target is checked once against its rows; jobs of
    a target that fails the check are not inserted. Rows are inserted in position order,
    so ids ascend with the positions. Returns one row: the ids, run_ats, created_at, task
    ids and queue ids, the arrays in id order.
    """
    jobs, tasks, queues = schema.private_jobs, schema.private_tasks, schema.private_job_queues
    targets = (
        func.json_to_recordset(cast(bindparam("targets", type_=Text), postgresql.JSON))
        .table_valued(
            column("k", Integer),
            column("t", Integer),
            column("i", Text),
            column("q", Integer),
            column("qn", Text),
        )
        .render_derived(name="target", with_types=True)
    )
    guarded = (
        select(targets.c.k, tasks.c.id.label("task_id"), queues.c.id.label("queue_id"))
        .select_from(
            targets.join(
                tasks, and_(tasks.c.id == targets.c.t, tasks.c.identifier == targets.c.i)
            ).outerjoin(
                queues, and_(queues.c.id == targets.c.q, queues.c.queue_name == targets.c.qn)
            )
        )
        .where(or_(targets.c.q.is_(None), queues.c.id.is_not(None)))
        .cte("guarded")
        .prefix_with("MATERIALIZED")
    )

    def elements(name: str) -> Any:
        return (
            func.json_array_elements(cast(bindparam(name, type_=Text), postgresql.JSON))
            .table_valued(column("value", postgresql.JSON), with_ordinality="o")
            .render_derived(name=name.rstrip("s"))
        )

    payload, spec = elements("payloads"), elements("jobs")
    option = spec.c.value

    def field_(key: str, type_: Any) -> Any:
        return cast(option[key].astext, type_)

    values = (
        select(
            guarded.c.queue_id,
            guarded.c.task_id,
            payload.c.value,
            func.coalesce(field_("pr", SmallInteger), 0),
            func.coalesce(field_("ra", _TIMESTAMPTZ), func.now()),
            func.coalesce(field_("ma", SmallInteger), 25),
            cast(option["f"], postgresql.JSONB),
        )
        .select_from(
            spec.join(payload, payload.c.o == spec.c.o).join(
                guarded, guarded.c.k == field_("k", Integer)
            )
        )
        .order_by(spec.c.o)
    )
    added = (
        insert(jobs)
        .from_select(_JOB_COLUMNS, values)
        .returning(jobs.c.id, jobs.c.run_at, jobs.c.created_at, jobs.c.task_id, jobs.c.job_queue_id)
        .cte("added")
    )
    # One row of arrays in id order (no row when nothing was inserted, and then no
    # notification): far fewer objects for the driver and the caller to build.
    count = func.count()

    def in_id_order(col: Any) -> Any:
        return func.array_agg(aggregate_order_by(col, added.c.id), type_=ARRAY(col.type))

    return (
        select(
            in_id_order(added.c.id),
            in_id_order(added.c.run_at),
            func.min(added.c.created_at),
            in_id_order(added.c.task_id),
            in_id_order(added.c.job_queue_id),
            _notification(count),
        )
        .select_from(added)
        .having(count > 0)
    )


@functools.lru_cache(maxsize=64)
def statements(schema: str) -> _Statements:
    """The statements of the worker schema called ``schema``."""
    return _Statements(worker_schema(schema), worker_functions(schema))


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
        self.tasks[task_id] = identifier
        self.task_ids[identifier] = task_id

    def learn_queue(self, queue_id: int, queue_name: str) -> None:
        self.queues[queue_id] = queue_name
        self.queue_ids[queue_name] = queue_id

    def forget(self, identifier: str, queue_name: str | None) -> None:
        """Drop the ids of a name whose row turned out to be gone."""
        self.task_ids.pop(identifier, None)
        if queue_name is not None:
            self.queue_ids.pop(queue_name, None)


def _spec_params(identifier: str, payload_json: str, spec: JobSpec) -> dict[str, Any]:
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


# -- arguments: misuse is named, with the call that was meant ------------------------------


def _kind(value: object) -> str:
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
            f"not {_kind(task)}; for a task identifier and a JSON payload use "
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
    raise InvalidArgumentType(f"{method} takes a JobSpec as its spec, not {_kind(spec)}{hint}")


def _check_identifier(identifier: object, method: str) -> str:
    if isinstance(identifier, str):
        return check_text("the task identifier", identifier)
    if getattr(identifier, "IDENTIFIER", None) is not None:
        raise InvalidArgumentType(
            f"{method} takes a task identifier (a string), not {_kind(identifier)}; "
            "for a typed task use add_job(task)"
        )
    raise InvalidArgumentType(
        f"{method} takes a task identifier (a string), not {_kind(identifier)}"
    )


def check_raw_jobs(jobs: object) -> list[RawJobSpec]:
    """The ``RawJobSpec`` items of ``add_raw_jobs``; misuse is named."""
    if isinstance(jobs, (str, bytes, Mapping, RawJobSpec)) or not isinstance(jobs, Iterable):
        raise InvalidArgumentType(f"add_raw_jobs takes a list of RawJobSpec, not {_kind(jobs)}")
    listed = list(jobs)
    for job in listed:
        if not isinstance(job, RawJobSpec):
            raise InvalidArgumentType(
                f"add_raw_jobs takes RawJobSpec items, not {_kind(job)}: write "
                "RawJobSpec(identifier, payload, JobSpec(...)); for typed tasks use "
                "add_jobs([(task, spec), ...])"
            )
        _check_identifier(job.identifier, "RawJobSpec")
        check_spec(job.spec, "RawJobSpec")
    return listed


def _iterable(value: object, what: str, method: str) -> Iterable[Any]:
    # A string is iterable too: one worker id would become one id per character.
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgumentType(f"{method} takes a list of {what}, not {_kind(value)}")
    return value


def _ids(job_ids: object, method: str) -> list[int]:
    ids = []
    for job_id in _iterable(job_ids, "job ids (e.g. [job.id])", method):
        try:
            ids.append(operator.index(job_id))
        except TypeError:
            raise InvalidArgumentType(
                f"{method} takes job ids (integers), not {_kind(job_id)}"
            ) from None
    return ids


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
        return encode_json_value(value)

    # -- reading rows back as Jobs ------------------------------------------------

    def _jobs(
        self,
        rows: Sequence[Mapping[Any, Any]],
        task_hint: Mapping[int, str] | None = None,
        queue_hint: Mapping[int, str] | None = None,
    ) -> Op[list[Job]]:
        names = self.names
        for task_id, identifier in (task_hint or {}).items():
            names.learn_task(task_id, identifier)
        for queue_id, queue_name in (queue_hint or {}).items():
            names.learn_queue(queue_id, queue_name)
        missing_tasks = {r["task_id"] for r in rows} - names.tasks.keys()
        if missing_tasks:
            result = yield self.sql.task_names, {"ids": sorted(missing_tasks)}
            for task_id, identifier in _pairs(result):
                names.learn_task(task_id, identifier)
        queue_ids = {r["job_queue_id"] for r in rows if r["job_queue_id"] is not None}
        missing_queues = queue_ids - names.queues.keys()
        if missing_queues:
            result = yield self.sql.queue_names, {"ids": sorted(missing_queues)}
            for queue_id, queue_name in _pairs(result):
                names.learn_queue(queue_id, queue_name)
        return [
            Job.from_row(
                row,
                # A task row deleted meanwhile (GC) leaves the name unknown: "".
                task_identifier=names.tasks.get(row["task_id"], ""),
                queue_name=(
                    names.queues.get(row["job_queue_id"])
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

    def _known_ids(self, identifier: str, spec: JobSpec) -> tuple[int, int | None] | None:
        """The cached task and queue ids of an unkeyed job the fast path can insert.

        ``None`` sends the job through the SQL functions: keyed jobs (their upsert rules
        live there), names not seen yet, and option values of unusual types, whose
        conversion is left to the functions' own casts.
        """
        if spec.job_key is not None or type(identifier) is not str:
            return None
        task_id = self.names.task_ids.get(identifier)
        if task_id is None:
            return None
        queue_name = spec.queue_name
        queue_id = None
        if queue_name is not None:
            if type(queue_name) is not str:
                return None
            queue_id = self.names.queue_ids.get(queue_name)
            if queue_id is None:
                return None
        if not _plain_options(spec):
            return None
        return task_id, queue_id

    # -- adding jobs --------------------------------------------------------------

    def add_job(
        self, identifier: str, payload: Any, spec: JobSpec | None, method: str = "add_raw_job"
    ) -> Op[Job]:
        _check_identifier(identifier, method)
        spec = check_spec(spec, method)
        payload_json = self._prepare(identifier, payload, spec)
        return (yield from self._insert_one(identifier, payload_json, spec))

    def add_batch_job(self, items: Sequence[Any], spec: JobSpec | None) -> Op[Job]:
        items = list(_iterable(items, "BatchTaskHandler items", "add_batch_job"))
        if not items:
            raise InvalidArgument("a batch job payload must contain at least one item")
        classes = {type(item) for item in items}
        for cls in classes:
            if not issubclass(cls, BatchTaskHandler):
                raise InvalidArgumentType(
                    f"add_batch_job takes BatchTaskHandler items, not {cls.__name__}; "
                    "for a single typed task use add_job(task)"
                )
        if len(classes) != 1:
            names = ", ".join(sorted(cls.__name__ for cls in classes))
            raise InvalidArgumentType(
                f"all items of a batch job must be of one BatchTaskHandler class, not {names}"
            )
        identifier = identifier_of(classes.pop())
        spec = check_spec(spec, "add_batch_job")
        payload = batch_payload(items)
        if self.hooks:
            payload = self.hooks.schedule(identifier, payload, spec)
            if not isinstance(payload, list):
                raise InvalidHookResult(
                    "a before_job_schedule hook must return a JSON array for batch jobs"
                )
            if not payload:
                raise InvalidHookResult(
                    "a before_job_schedule hook emptied a batch job: a batch job payload must "
                    "contain at least one item"
                )
        return (yield from self._insert_one(identifier, encode_payload(payload), spec))

    def _insert_one(self, identifier: str, payload_json: str, spec: JobSpec) -> Op[Job]:
        known = self._known_ids(identifier, spec)
        if known is not None:
            task_id, queue_id = known
            flags = _flags_json(spec.flags)
            params = {
                "task_id": task_id,
                "identifier": identifier,
                "payload": payload_json,
                "priority": spec.priority,
                "run_at": spec.run_at,
                "max_attempts": spec.max_attempts,
                "flags": flags,
            }
            statement = self.sql.insert_job
            if queue_id is not None:
                params["queue_id"] = queue_id
                params["queue_name"] = spec.queue_name
                statement = self.sql.insert_queued_job
            result = yield statement, params
            inserted: Sequence[Any] | None = result.first()
            if inserted is not None:
                return _inserted_job(
                    inserted[0],
                    inserted[1],
                    inserted[2],
                    identifier,
                    spec,
                    json.loads(payload_json),
                    task_id,
                    queue_id,
                )
            # The task or queue row is gone (deleted by a cleanup, or its creation rolled
            # back): nothing was inserted or notified; the SQL function creates it anew.
            self.names.forget(identifier, spec.queue_name)
        params = _spec_params(identifier, payload_json, spec)
        for _ in range(KEY_RACE_RETRIES):
            result = yield self.sql.add_job, params
            row = _one_row(result)
            if row["id"] is not None:
                break
            # Node issue #580: the keyed job was locked between add_jobs' detach step
            # and its upsert, so nothing was written. Trying again detaches it properly.
        else:
            raise JobKeyLocked(
                f"could not add job {identifier!r} with key {spec.job_key!r}: the keyed job "
                f"was locked by a worker in each of {KEY_RACE_RETRIES} attempts; nothing "
                "was written",
                [str(spec.job_key)],
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
        modes = {
            mode.value if isinstance(mode, JobKeyMode) else mode
            for mode in {job.spec.job_key_mode for job in jobs}
        }
        if JobKeyMode.UNSAFE_DEDUPE.value in modes:
            raise InvalidArgument(
                "UNSAFE_DEDUPE job_key_mode is not supported in batch add_jobs; "
                "add such jobs one at a time with add_job"
            )
        preserve = JobKeyMode.PRESERVE_RUN_AT.value in modes
        # Hooks and payload encoding run for every job before anything is written.
        texts: list[str] | None = None
        values: list[Any] = []
        if self.hooks:
            texts = [self._prepare(job.identifier, job.payload, job.spec) for job in jobs]
        else:
            values = to_json_values([job.payload for job in jobs])
        targets = self._targets(jobs)
        if targets is not None:
            # All the payloads as one JSON array, encoded (or joined) in one go.
            document = "[" + ",".join(texts) + "]" if texts else encode_json_values(values)
            added = yield from self._insert_many(jobs, document, targets)
        else:
            if texts is None:
                texts = [encode_json_value(value) for value in values]
            # One statement for the whole batch, like Node's: one notification, and every
            # key rule applied at once. It also teaches the cache the new names' ids.
            added = yield from self._add_jobs_sql(jobs, texts, preserve)
        if len(jobs) >= ANALYZE_THRESHOLD:
            yield self.sql.analyze, {}
        return added

    def _targets(self, jobs: Sequence[RawJobSpec]) -> _Targets | None:
        """For the fast path: each job's target number, and the targets' (task, queue) ids.

        ``None`` when any job must go through the SQL function.
        """
        numbers: list[int] = []
        elements: list[str] = []
        targets: list[tuple[int, int | None]] = []
        described: list[dict[str, Any]] = []
        known: dict[tuple[int, int | None], int] = {}
        # Runs of jobs with one identifier and one spec object share everything here.
        last_identifier: str | None = None
        last_spec: JobSpec | None = None
        number = 0
        element = ""
        for job in jobs:
            identifier, spec = job.identifier, job.spec
            if spec is not last_spec or identifier != last_identifier:
                ids = self._known_ids(identifier, spec)
                if ids is None:
                    return None
                found = known.get(ids)
                if found is None:
                    found = known[ids] = len(targets)
                    targets.append(ids)
                    names = {"i": identifier, "qn": spec.queue_name}
                    described.append({"k": found, "t": ids[0], "q": ids[1], **names})
                number = found
                element = f'{{"k":{number}{_options_json(spec)}}}'
                last_identifier, last_spec = identifier, spec
            numbers.append(number)
            elements.append(element)
        return _Targets(numbers, targets, json.dumps(described), "[" + ",".join(elements) + "]")

    def _insert_many(
        self, jobs: Sequence[RawJobSpec], document: str, targets: _Targets
    ) -> Op[list[Job]]:
        """The fast path of a batch: one INSERT of jobs whose ids are all cached.

        ``document`` is the JSON array of the jobs' payloads.
        """
        numbers = targets.numbers
        result = yield (
            self.sql.insert_jobs,
            {"targets": targets.described, "payloads": document, "jobs": targets.options},
        )
        # No row at all when nothing was inserted.
        row: Sequence[Any] = result.first() or ([], [], None, [], [])
        ids, run_ats, created_at, task_ids, queue_ids = row[:5]
        # The payloads as stored: the text sent, decoded in one go.
        payloads: list[Any] = json.loads(document)
        target_ids = targets.ids
        if len(ids) == len(jobs):
            # Ids ascend with the positions (rows are inserted in position order).
            return [
                _inserted_job(
                    job_id,
                    run_at,
                    created_at,
                    job.identifier,
                    job.spec,
                    payload,
                    *target_ids[number],
                )
                for job, job_id, run_at, payload, number in zip(
                    jobs, ids, run_ats, payloads, numbers, strict=True
                )
            ]
        # Jobs of a task or queue whose row is gone were left out, all of them: the
        # (task, queue) pairs that came back tell which.
        present = set(zip(task_ids, queue_ids, strict=True))
        gone = {k for k, ids_ in enumerate(target_ids) if ids_ not in present}
        inserted = [i for i, number in enumerate(numbers) if number not in gone]
        missing = [i for i, number in enumerate(numbers) if number in gone]
        added: list[Job | None] = [None] * len(jobs)
        for i, job_id, run_at in zip(inserted, ids, run_ats, strict=True):
            job = jobs[i]
            added[i] = _inserted_job(
                job_id,
                run_at,
                created_at,
                job.identifier,
                job.spec,
                payloads[i],
                *target_ids[numbers[i]],
            )
        for i in missing:
            self.names.forget(jobs[i].identifier, jobs[i].spec.queue_name)
        # The decoded payloads encode back to the very text sent.
        again = yield from self._add_jobs_sql(
            [jobs[i] for i in missing], [encode_json_value(payloads[i]) for i in missing], False
        )
        for i, again_job in zip(missing, again, strict=True):
            added[i] = again_job
        return added  # type: ignore[return-value]

    def _add_jobs_sql(
        self, prepared: Sequence[RawJobSpec], texts: Sequence[str], preserve: bool
    ) -> Op[list[Job]]:
        """A batch through the ``add_jobs`` SQL function; the jobs in input order."""
        encoded: list[str] = []
        plain_tails: dict[str, str] = {}  # per identifier, for specs setting no option
        for job, payload_json in zip(prepared, texts, strict=True):
            spec = job.spec
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
        keys = [job.spec.job_key for job in prepared]
        rows: list[dict[str, Any]] = []
        pending: Sequence[int] = range(len(encoded))
        for _ in range(KEY_RACE_RETRIES):
            result = yield (
                self.sql.add_jobs_text,
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
            raise JobKeyLocked(
                f"could not add {len(pending)} keyed job(s): their keyed jobs were locked by "
                f"workers in each of {KEY_RACE_RETRIES} attempts",
                [str(keys[i]) for i in pending],
            )
        stored = [row["payload"] for row in rows]
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        task_hint = self._single_hint(rows, "task_id", {job.identifier for job in prepared})
        queue_hint = self._single_hint(
            rows, "job_queue_id", {job.spec.queue_name for job in prepared}
        )
        added = yield from self._jobs(rows, task_hint, queue_hint)
        return _in_input_order(prepared, texts, added, stored)

    # -- administration -----------------------------------------------------------

    def remove_job(self, job_key: str) -> Op[Job | None]:
        if not isinstance(job_key, str):
            hint = ""
            if isinstance(job_key, int) and not isinstance(job_key, bool):
                hint = f"; to delete the job with id {job_key} use complete_jobs([{job_key}])"
            raise InvalidArgumentType(
                f"remove_job takes a job key (a string), not {_kind(job_key)}{hint}"
            )
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
        return self._rows(self.sql.complete_jobs, {"ids": _ids(ids, "complete_jobs")})

    def permanently_fail_jobs(self, ids: Iterable[int], reason: str | None) -> Op[list[Job]]:
        ids = _ids(ids, "permanently_fail_jobs")
        return self._rows(self.sql.permanently_fail_jobs, {"ids": ids, "reason": reason})

    def reschedule_jobs(self, ids: Iterable[int], options: object) -> Op[list[Job]]:
        if not isinstance(options, RescheduleJobOptions):
            raise InvalidArgumentType(
                f"reschedule_jobs takes RescheduleJobOptions, not {_kind(options)}: write "
                "RescheduleJobOptions(run_at=..., priority=...)"
            )
        job_ids = _ids(ids, "reschedule_jobs")
        run_at = options.run_at
        if isinstance(run_at, timedelta):
            # From the database's clock, as every other time the jobs hold.
            now: datetime = (yield self.sql.now, {}).scalar_one()
            try:
                run_at = now + run_at
            except OverflowError:
                raise ValueOutOfRange(
                    f"RescheduleJobOptions.run_at: now() + {run_at} is out of range"
                ) from None
            check_run_at("RescheduleJobOptions.run_at (now() + timedelta)", run_at)
        params = {
            "ids": job_ids,
            "run_at": run_at,
            "priority": options.priority,
            "attempts": options.attempts,
            "max_attempts": options.max_attempts,
        }
        return (yield from self._rows(self.sql.reschedule_jobs, params))

    def force_unlock_workers(self, worker_ids: Iterable[str]) -> Op[None]:
        ids = []
        for worker_id in _iterable(worker_ids, "worker ids", "force_unlock_workers"):
            if not isinstance(worker_id, str):
                raise InvalidArgumentType(
                    f"force_unlock_workers takes worker ids (strings), not {_kind(worker_id)}"
                )
            ids.append(worker_id)
        if ids:
            yield self.sql.force_unlock_workers, {"worker_ids": ids}

    def cleanup(self, tasks: Iterable[CleanupTask | str] | None) -> Op[None]:
        chosen = [CleanupTask.GC_TASK_IDENTIFIERS, CleanupTask.GC_JOB_QUEUES]
        if tasks is not None:
            chosen = []
            for task in _iterable(tasks, "CleanupTask values", "cleanup"):
                try:
                    chosen.append(CleanupTask(task))
                except ValueError:
                    known = ", ".join(t.value for t in CleanupTask)
                    raise InvalidArgument(
                        f"unknown cleanup task {task!r}; expected one of {known}"
                    ) from None
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


class _Targets(NamedTuple):
    """The distinct (task, queue) pairs of a fast-path batch."""

    numbers: list[int]  # per job, its pair's number
    ids: list[tuple[int, int | None]]  # per number, the cached task and queue ids
    described: str  # the pairs with their names, as JSON, for the insert's check
    options: str  # per job, its pair's number and options, as a JSON array


def _plain_options(spec: JobSpec) -> bool:
    """Whether the fast path stores these options exactly as the SQL functions would."""
    priority, max_attempts, flags = spec.priority, spec.max_attempts, spec.flags
    return (
        (priority is None or type(priority) is int)
        and (max_attempts is None or type(max_attempts) is int)
        and (flags is None or all(type(flag) is str and "\x00" not in flag for flag in flags))
    )


def _flags_json(flags: Sequence[str] | None) -> str | None:
    """The ``flags`` column's value, as ``add_jobs`` builds it: ``{flag: true}`` or NULL."""
    if not flags:
        return None
    return encode_json_value(dict.fromkeys(flags, True))


def _options_json(spec: JobSpec) -> str:
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
    flags = _flags_json(spec.flags)
    if flags is not None:
        members += f',"f":{flags}'
    return members


def _inserted_job(
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


def _in_input_order(
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


def _pairs(result: Result[Any]) -> list[tuple[Any, Any]]:
    """The rows of a two-column result as plain tuples."""
    rows: list[Sequence[Any]] = list(result.all())
    return [(row[0], row[1]) for row in rows]


def _one_row(result: Result[Any]) -> dict[str, Any]:
    """The single row of ``result`` as a plain dict (``Result.one()`` semantics)."""
    return dict(zip(result.keys(), result.one(), strict=True))


def _dict_rows(result: Result[Any]) -> list[dict[str, Any]]:
    """The rows of ``result`` as plain dicts (cheaper to read than ``RowMapping``)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result.all()]
