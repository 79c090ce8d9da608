"""The dashboard's reads: a bounded, keyset-paged job list, and its request settings.

The job list pages newest first by ``id`` (the primary key) with a cursor, never an
``OFFSET``, so a page deep in a million jobs costs what the first does. Filters on
columns without an index of their own (state, task, queue, text in ``last_error``)
look at a *window* of at most ``:scan`` jobs below the cursor, read backwards along the
primary key: a page stops as soon as it is full, or after the window, and then tells
where to search further (:attr:`DashboardStatements.scan_end`). A key filter uses the
key's unique index instead. The worker schema stays Node's: no index is added for this.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Text,
    bindparam,
    func,
    select,
)

from ..admin import JobState
from ..schema import WorkerSchema
from .admin import state_conditions
from .common import IDEMPOTENT_OPTION

__all__ = ["ERROR_PREVIEW", "DashboardStatements"]

#: Characters of ``last_error`` a job list row carries (the job's page shows all of it).
ERROR_PREVIEW = 300


class DashboardStatements:
    """The dashboard's statements for one worker schema."""

    def __init__(self, schema: WorkerSchema) -> None:
        jobs = schema.private_jobs
        self._schema = schema
        # Per request transaction: a bound on each statement, and reads that cannot write.
        self.statement_timeout = select(
            func.set_config("statement_timeout", bindparam("ms", type_=Text), True)
        )
        self.read_only = select(func.set_config("transaction_read_only", "on", True))
        # The highest job id (from the primary key) and the clock: between two samples
        # with totals, the jobs added and those finished meanwhile.
        self.max_job_id = select(func.max(jobs.c.id).label("max_id"), func.now().label("now"))
        self.sample = select(
            func.count().label("total"), func.max(jobs.c.id).label("max_id"), func.now()
        )
        # Where a window of ``:scan`` jobs below ``:before`` ends, and how many it held.
        window = (
            select(jobs.c.id)
            .where(jobs.c.id < bindparam("before", type_=BigInteger))
            .order_by(jobs.c.id.desc())
            .limit(bindparam("scan", type_=Integer))
            .subquery("window")
        )
        self.scan_end = select(func.min(window.c.id).label("low"), func.count().label("seen"))
        # The named queues and their holders, without counting jobs (the overview has
        # the counts from the queue health numbers' one scan).
        queues = schema.private_job_queues
        self.queues = (
            select(queues.c.queue_name, queues.c.locked_by, queues.c.locked_at)
            .order_by(queues.c.queue_name)
            .limit(bindparam("limit", type_=Integer))
        )

    @functools.cache  # noqa: B019 - one per schema, 80 variants at most
    def jobs_page(
        self, state: JobState, *, by_task: bool, by_queue: bool, by_key: bool, by_text: bool
    ) -> Select[Any]:
        """A page of jobs below ``:before``, newest first, ``:limit`` rows at most.

        Without ``by_key`` only the ``:scan`` jobs below the cursor are looked at. The
        filters: ``:task_identifier``, ``:queue_name``, ``:key`` (exact) and ``:text``
        (a case-insensitive substring of ``last_error``). Payloads are not read; the
        error is cut to :data:`ERROR_PREVIEW` characters.
        """
        ws = self._schema
        jobs, tasks, queues = ws.private_jobs, ws.private_tasks, ws.private_job_queues
        columns = [
            jobs.c.id,
            jobs.c.task_id,
            jobs.c.job_queue_id,
            jobs.c.priority,
            jobs.c.run_at,
            jobs.c.attempts,
            jobs.c.max_attempts,
            jobs.c.last_error,
            jobs.c.key,
            jobs.c.locked_at,
            jobs.c.locked_by,
            jobs.c.created_at,
        ]
        below = jobs.c.id < bindparam("before", type_=BigInteger)
        if by_key:
            # The key's unique index finds the one job: no window needed.
            source = (
                select(*columns)
                .where(below, jobs.c.key == bindparam("key", type_=Text))
                .subquery("window")
            )
        else:
            # A LIMIT in the subquery keeps the filters above it: the scan is bounded.
            source = (
                select(*columns)
                .where(below)
                .order_by(jobs.c.id.desc())
                .limit(bindparam("scan", type_=Integer))
                .subquery("window")
            )
        conditions: list[ColumnElement[bool]] = []
        condition = state_conditions(source).get(state)
        if condition is not None:
            conditions.append(condition)
        if by_task:
            task_id = (
                select(tasks.c.id)
                .where(tasks.c.identifier == bindparam("task_identifier", type_=Text))
                .scalar_subquery()
            )
            conditions.append(source.c.task_id == task_id)
        if by_queue:
            queue_id = (
                select(queues.c.id)
                .where(queues.c.queue_name == bindparam("queue_name", type_=Text))
                .scalar_subquery()
            )
            conditions.append(source.c.job_queue_id == queue_id)
        if by_text:
            needle = func.lower(bindparam("text", type_=Text))
            conditions.append(func.strpos(func.lower(source.c.last_error), needle) > 0)
        page = (
            select(source)
            .where(*conditions)
            .order_by(source.c.id.desc())
            .limit(bindparam("limit", type_=Integer))
            .subquery("page")
        )
        # Names are joined to the page's few rows only.
        return (
            select(
                page.c.id,
                tasks.c.identifier.label("task_identifier"),
                queues.c.queue_name,
                page.c.priority,
                page.c.run_at,
                page.c.attempts,
                page.c.max_attempts,
                func.left(page.c.last_error, ERROR_PREVIEW).label("last_error"),
                page.c.key,
                page.c.locked_at,
                page.c.locked_by,
                page.c.created_at,
                func.now().label("now"),
            )
            .join(tasks, tasks.c.id == page.c.task_id)
            .outerjoin(queues, queues.c.id == page.c.job_queue_id)
            .order_by(page.c.id.desc())
            .execution_options(**{IDEMPOTENT_OPTION: True})  # a read
        )

    def variants(self) -> dict[str, Any]:
        """Every statement :meth:`jobs_page` builds, by name."""
        found: dict[str, Any] = {}
        for state in JobState:
            for flags in range(16):
                by = [bool(flags & bit) for bit in (1, 2, 4, 8)]
                labels = ("task", "queue", "key", "text")
                names = [n for n, on in zip(labels, by, strict=True) if on]
                found[f"jobs_page[{','.join([state.value, *names])}]"] = self.jobs_page(
                    state, by_task=by[0], by_queue=by[1], by_key=by[2], by_text=by[3]
                )
        return found
