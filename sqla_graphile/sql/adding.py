"""Adding jobs, and the task and queue rows they refer to.

``add_job`` / ``add_jobs_text`` call the schema's SQL functions (every key rule lives
there). The ``insert_*`` statements are the fast path of unkeyed jobs whose task (and
queue) ids are cached: a direct ``INSERT`` that notifies as ``add_jobs`` does.

Task registration inserts only the identifiers that are missing, as the schema's
``add_jobs`` does: no identity value is consumed for a task that already has its row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    Integer,
    Select,
    SmallInteger,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    column,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import TextClause

from ..functions import WorkerFunctions
from ..schema import WorkerSchema, literal_sql
from .common import TIMESTAMPTZ, job_rows, jobs_inserted

__all__ = ["AddingStatements"]

_JOB_COLUMNS = ("job_queue_id", "task_id", "payload", "priority", "run_at", "max_attempts", "flags")


class AddingStatements:
    """The statements that add jobs and register tasks, for one worker schema."""

    def __init__(self, schema: WorkerSchema, fn: WorkerFunctions) -> None:
        jobs, tasks = schema.private_jobs, schema.private_tasks
        queues = schema.private_job_queues
        self.add_job = job_rows(
            jobs,
            fn.add_job(
                bindparam("identifier", type_=Text),
                bindparam("payload", type_=Text),
                queue_name=bindparam("queue_name", type_=Text),
                run_at=bindparam("run_at", type_=TIMESTAMPTZ),
                max_attempts=bindparam("max_attempts", type_=Integer),
                job_key=bindparam("job_key", type_=Text),
                priority=bindparam("priority", type_=Integer),
                flags=bindparam("flags", type_=ARRAY(Text)),
                job_key_mode=bindparam("job_key_mode", type_=Text),
            ),
        )
        # add_jobs' payloads as the stored text: the rows are matched back to their specs
        # by it, and decoded once.
        calls = fn.add_jobs(
            fn.specs_from_json(bindparam("specs", type_=Text)),
            bindparam("preserve_run_at", type_=Boolean),
        ).table_valued(*(column(c.name, c.type) for c in jobs.columns), name="job")
        self.add_jobs_text = select(
            *(cast(c, Text).label(c.name) if c.name == "payload" else c for c in calls.c)
        ).select_from(calls)
        self.insert_job = _insert_one(schema, queued=False)
        self.insert_queued_job = _insert_one(schema, queued=True)
        self.insert_jobs = _insert_many(schema)
        self.insert_jobs_counted = _insert_many(schema, counted=True)
        self.insert_uniform_jobs = _insert_uniform(schema)
        self.insert_uniform_jobs_counted = _insert_uniform(schema, counted=True)
        self.analyze: TextClause = literal_sql(f"analyze {schema.quoted_name}._private_jobs")
        self.register_tasks = _register_tasks(schema)
        # Ids by identifier (the worker's cache, as Node's) and names by id (rows read
        # back as jobs).
        self.task_ids = select(tasks.c.id, tasks.c.identifier).where(
            tasks.c.identifier == any_(bindparam("identifiers", type_=ARRAY(Text)))
        )
        self.task_names = select(tasks.c.id, tasks.c.identifier).where(
            tasks.c.id == func.any(bindparam("ids", type_=ARRAY(Integer)))
        )
        self.queue_names = select(queues.c.id, queues.c.queue_name).where(
            queues.c.id == func.any(bindparam("ids", type_=ARRAY(Integer)))
        )


def _register_tasks(schema: WorkerSchema) -> Insert:
    """Give each of ``:identifiers`` its task row; only the missing ones are inserted."""
    tasks = schema.private_tasks
    names = (
        func.unnest(bindparam("identifiers", type_=ARRAY(Text)))
        .table_valued(column("identifier", Text))
        .render_derived(name="wanted")
    )
    missing = select(names.c.identifier).where(
        ~exists().where(tasks.c.identifier == names.c.identifier)
    )
    # ON CONFLICT covers a name inserted concurrently since the check.
    return pg_insert(tasks).from_select(["identifier"], missing).on_conflict_do_nothing()


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
            func.coalesce(bindparam("run_at", type_=TIMESTAMPTZ), func.now()),
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
        added.c.id, added.c.run_at, added.c.created_at, jobs_inserted(literal(1, Integer))
    ).select_from(added)


def _insert_many(schema: WorkerSchema, *, counted: bool = False) -> Select[Any]:
    """Insert many unkeyed jobs as ``add_jobs`` would, given their task and queue ids.

    ``targets`` is a JSON array of ``{k, t, i, q, qn}``: a number, a task id and its
    identifier, a queue id and its name (or nulls). ``payloads`` is the JSON array of the
    jobs' payloads, ``jobs`` the JSON array of their ``{k, pr, ra, ma, f}``: target
    number, priority, run_at, max_attempts, flags object (absent fields are NULL); the
    two are matched by position. Each target is checked once against its rows; jobs of
    a target that fails the check are not inserted. Rows are inserted in position order,
    so ids ascend with the positions. Returns one row: the ids, run_ats, created_at, task
    ids and queue ids, the arrays in id order; ``counted``, only how many jobs were
    inserted and the numbers of the targets that passed the check (nothing per job).
    """
    tasks, queues = schema.private_tasks, schema.private_job_queues
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
            func.coalesce(field_("ra", TIMESTAMPTZ), func.now()),
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
    return _inserted(schema, values, counted, select(func.array_agg(guarded.c.k)))


def _insert_uniform(schema: WorkerSchema, *, counted: bool = False) -> Select[Any]:
    """:func:`_insert_many` for jobs that share one target and one set of options.

    The common bulk add: the target and options are plain parameters (as for
    :func:`_insert_one`), so only the payloads travel as a JSON array and no per-job
    options are read or joined. Returns what :func:`_insert_many` returns, the target
    numbered 0.
    """
    tasks, queues = schema.private_tasks, schema.private_job_queues
    queue_id = bindparam("queue_id", type_=Integer)
    guarded = (
        select(tasks.c.id.label("task_id"), queues.c.id.label("queue_id"))
        .select_from(
            tasks.outerjoin(
                queues,
                and_(
                    queues.c.id == queue_id,
                    queues.c.queue_name == bindparam("queue_name", type_=Text),
                ),
            )
        )
        .where(
            tasks.c.id == bindparam("task_id", type_=Integer),
            tasks.c.identifier == bindparam("identifier", type_=Text),
            or_(queue_id.is_(None), queues.c.id.is_not(None)),
        )
        .cte("guarded")
        .prefix_with("MATERIALIZED")
    )
    payload = (
        func.json_array_elements(cast(bindparam("payloads", type_=Text), postgresql.JSON))
        .table_valued(column("value", postgresql.JSON), with_ordinality="o")
        .render_derived(name="payload")
    )
    values = (
        select(
            guarded.c.queue_id,
            guarded.c.task_id,
            payload.c.value,
            func.coalesce(cast(bindparam("priority", type_=Integer), SmallInteger), 0),
            func.coalesce(bindparam("run_at", type_=TIMESTAMPTZ), func.now()),
            func.coalesce(cast(bindparam("max_attempts", type_=Integer), SmallInteger), 25),
            cast(bindparam("flags", type_=Text), postgresql.JSONB),
        )
        .select_from(payload.join(guarded, true()))
        .order_by(payload.c.o)
    )
    passed = select(func.array_agg(literal(0, Integer))).select_from(guarded)
    return _inserted(schema, values, counted, passed)


def _inserted(
    schema: WorkerSchema, values: Select[Any], counted: bool, passed: Select[Any]
) -> Select[Any]:
    """Insert the rows of ``values`` and answer with one row, notifying as ``add_jobs``.

    The row holds the ids, run_ats, created_at, task ids and queue ids of the jobs
    inserted, the arrays in id order; or, ``counted``, only how many were inserted and
    the numbers of the targets that passed the check (``passed``). No row at all when
    nothing was inserted, and then no notification.
    """
    jobs = schema.private_jobs
    count = func.count()
    if counted:
        inserted = insert(jobs).from_select(_JOB_COLUMNS, values).returning(jobs.c.id).cte("added")
        return (
            select(count, passed.scalar_subquery(), jobs_inserted(count))
            .select_from(inserted)
            .having(count > 0)
        )
    added = (
        insert(jobs)
        .from_select(_JOB_COLUMNS, values)
        .returning(jobs.c.id, jobs.c.run_at, jobs.c.created_at, jobs.c.task_id, jobs.c.job_queue_id)
        .cte("added")
    )

    # Far fewer objects for the driver and the caller to build than a row per job.
    def in_id_order(col: Any) -> Any:
        return func.array_agg(aggregate_order_by(col, added.c.id), type_=ARRAY(col.type))

    return (
        select(
            in_id_order(added.c.id),
            in_id_order(added.c.run_at),
            func.min(added.c.created_at),
            in_id_order(added.c.task_id),
            in_id_order(added.c.job_queue_id),
            jobs_inserted(count),
        )
        .select_from(added)
        .having(count > 0)
    )
