"""The worker's protocol: fetching jobs and writing what became of them.

The protocol is Node graphile-worker 0.18's, so Node and Python workers share one queue:

``fetch``
    Lock up to ``:limit`` runnable jobs and their named queues in one statement. A job is
    a candidate when it is available, due, of one of our task ids, free of forbidden
    flags, and either has no queue or belongs to a queue that is unlocked and
    row-lockable right now. At most one job per named queue is taken, so a named queue
    runs one job at a time across every worker.
``complete`` / ``fail`` / ``return_jobs``
    Touch only rows whose ``locked_by`` is still ours, and unlock the queues we hold for
    them; they return the ids they really wrote, so a lost lock is noticed. A returned
    job that Node's ``add_job``/``remove_job`` detached meanwhile is deleted, never revived.
``reclaim``
    Return every row locked under our id that we do not know of: the jobs of a fetch
    whose answer was lost (the statement committed, the reply never came).
``claim_keyed``
    Before a keyed job that waited in the local queue starts: is it still ours and still
    keyed? A replaced or removed one is deleted instead of run, as with Node's defaults.
``sweep``
    Node's 4-hour rule: unlock jobs and queues locked more than
    :data:`~sqla_graphile.sql.common.NODE_LOCK_EXPIRY` ago.

None of these statements touches ``updated_at``, as Node's don't. The task ids a fetch
takes come from :attr:`AddingStatements.task_ids
<sqla_graphile.sql.adding.AddingStatements.task_ids>` (registered by its
``register_tasks``): the worker caches them, as Node does, and looks again whenever
announced jobs are not found and at least every poll interval, so that a garbage
collection of task rows by any process hides new jobs from it only briefly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import (
    ARRAY,
    CTE,
    JSON,
    BigInteger,
    ColumnElement,
    Delete,
    Integer,
    Select,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    column,
    delete,
    exists,
    false,
    func,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.sql.dml import Update

from ..job import Job
from ..schema import WorkerSchema
from .common import lock_expired, seconds

__all__ = ["FETCHED", "WorkerStatements"]

#: The columns of a fetch's rows, in this order: a job's fields, but its task's identifier
#: (the worker knows it from the task id).
FETCHED = tuple(f.name for f in dataclasses.fields(Job) if f.name != "task_identifier")


class WorkerStatements:
    """The worker's statements for one worker schema.

    Parameters: ``worker_id`` (our lock id) everywhere; ``task_ids`` (int[]), ``limit``
    (batch fetches only) and, for the ``*_with_flags`` fetches, ``forbidden`` (text[]) for
    fetches; ``ids``
    (bigint[]) for complete and return; ``ids``, ``messages`` and ``payloads`` (text[],
    JSON text or NULL to keep the payload) for fail.

    The fetches return the locked jobs' columns and ``queue_name``, as :data:`FETCHED`
    names them, payload and flags as JSON text; the rows come in no order. The
    single-job fetches are Node's batch-size-1 statement, cheaper when one job is wanted.
    """

    def __init__(self, schema: WorkerSchema) -> None:
        self.schema = schema
        self.fetch = self._fetch(batch=True, with_flags=False)
        self.fetch_with_flags = self._fetch(batch=True, with_flags=True)
        self.fetch_one = self._fetch(batch=False, with_flags=False)
        self.fetch_one_with_flags = self._fetch(batch=False, with_flags=True)
        self.complete = self._complete()
        self.fail = self._fail()
        self.return_jobs = self._return_jobs()
        self.reclaim = self._reclaim()
        self.claim_keyed = self._claim_keyed()
        self.written = self._written()
        self.sweep = self._sweep()

    # -- fetch ----------------------------------------------------------------------

    def _fetch(self, *, batch: bool, with_flags: bool) -> Update:
        jobs = self.schema.private_jobs
        queues = self.schema.private_job_queues
        worker_id = bindparam("worker_id", type_=Text)

        # Row-locking every available queue for the statement's duration makes concurrent
        # fetchers (Node's included) skip them: two workers can never both pick a job of
        # the same queue.
        lockable_queues = (
            select(queues.c.id)
            .where(queues.c.is_available == true())
            .with_for_update(skip_locked=True)
        )
        conditions: list[ColumnElement[bool]] = [
            # "= true" (not "is true") so the planner can use the partial indexes.
            jobs.c.is_available == true(),
            jobs.c.run_at <= func.now(),
            # Ids, not names: compared with ``= any(array)`` the planner walks the
            # (priority, run_at) index and stops at the limit.
            jobs.c.task_id == any_(bindparam("task_ids", type_=ARRAY(Integer))),
            or_(jobs.c.job_queue_id.is_(None), jobs.c.job_queue_id.in_(lockable_queues)),
        ]
        if with_flags:
            forbidden = bindparam("forbidden", type_=ARRAY(Text))
            conditions.append(or_(jobs.c.flags.is_(None), not_(jobs.c.flags.has_any(forbidden))))
        candidates = (
            select(jobs.c.id, jobs.c.job_queue_id, jobs.c.priority, jobs.c.run_at)
            .where(*conditions)
            .order_by(jobs.c.priority, jobs.c.run_at)
            .limit(bindparam("limit", type_=Integer) if batch else literal_column("1", Integer))
            .with_for_update(skip_locked=True)
            .cte("candidates")
        )
        chosen = candidates
        if batch:
            ranked = select(
                candidates.c.id,
                candidates.c.job_queue_id,
                func.row_number()
                .over(
                    partition_by=candidates.c.job_queue_id,
                    order_by=(candidates.c.priority, candidates.c.run_at),
                )
                .label("rank_in_queue"),
            ).cte("ranked")
            # Jobs without a queue are all kept; of each named queue only the first.
            chosen = (
                select(ranked.c.id, ranked.c.job_queue_id)
                .where(or_(ranked.c.job_queue_id.is_(None), ranked.c.rank_in_queue == 1))
                .cte("chosen")
            )
        locked_queues = (
            update(queues)
            .where(queues.c.id == chosen.c.job_queue_id)
            .values(locked_by=worker_id, locked_at=func.now())
            .returning(queues.c.id, queues.c.queue_name)
            .cte("locked_queues")
        )
        # The chosen jobs with the names of the queues just locked (none for a job
        # without a queue); the task identifier is the caller's, who knows its task ids.
        targets = (
            select(chosen.c.id, locked_queues.c.queue_name)
            .select_from(
                chosen.outerjoin(locked_queues, locked_queues.c.id == chosen.c.job_queue_id)
            )
            .subquery("targets")
        )
        returned: dict[str, ColumnElement[Any]] = {c.name: c for c in jobs.c}
        returned["queue_name"] = targets.c.queue_name
        # As text: the worker decodes the payload with the engine's JSON deserializer,
        # the flags (keys it reads) with the standard one.
        returned["payload"] = cast(jobs.c.payload, Text).label("payload")
        returned["flags"] = cast(jobs.c.flags, Text).label("flags")
        return (
            update(jobs)
            .where(jobs.c.id == targets.c.id)
            .values(attempts=jobs.c.attempts + 1, locked_by=worker_id, locked_at=func.now())
            .returning(*(returned[name] for name in FETCHED))
        )

    # -- releasing jobs -------------------------------------------------------------

    def _unlock_queues_of(self, released: CTE) -> CTE:
        """An UPDATE (as a CTE) unlocking the queues of ``released`` rows that we hold."""
        queues = self.schema.private_job_queues
        return (
            update(queues)
            .where(
                queues.c.id.in_(select(released.c.job_queue_id)),
                queues.c.locked_by == bindparam("worker_id", type_=Text),
            )
            .values(locked_by=null(), locked_at=null())
            .returning(queues.c.id)
            .cte("unlocked_queues")
        )

    def _complete(self) -> Select[Any]:
        jobs = self.schema.private_jobs
        deleted = _delete_ours(jobs).returning(jobs.c.id, jobs.c.job_queue_id).cte("completed_jobs")
        unlocked = self._unlock_queues_of(deleted)
        return select(deleted.c.id, deleted.c.job_queue_id).add_cte(unlocked)

    def _fail(self) -> Select[Any]:
        jobs = self.schema.private_jobs
        failures = (
            func.unnest(
                bindparam("ids", type_=ARRAY(BigInteger)),
                bindparam("messages", type_=ARRAY(Text)),
                bindparam("payloads", type_=ARRAY(Text)),
            )
            .table_valued(
                column("id", BigInteger), column("message", Text), column("payload", Text)
            )
            .render_derived(name="failure")
        )
        # Node's backoff, always by the database's clock: attempts is the value already
        # incremented at fetch, so the first failure waits e seconds.
        retry_at = func.greatest(func.now(), jobs.c.run_at) + seconds(
            func.exp(func.least(jobs.c.attempts, 10))
        )
        failed = (
            update(jobs)
            .where(
                jobs.c.id == failures.c.id,
                jobs.c.locked_by == bindparam("worker_id", type_=Text),
            )
            .values(
                last_error=failures.c.message,
                run_at=retry_at,
                locked_by=null(),
                locked_at=null(),
                payload=func.coalesce(cast(failures.c.payload, JSON), jobs.c.payload),
            )
            .returning(
                jobs.c.id, jobs.c.job_queue_id, jobs.c.attempts, jobs.c.max_attempts, jobs.c.run_at
            )
            .cte("failed_jobs")
        )
        unlocked = self._unlock_queues_of(failed)
        return select(
            failed.c.id, failed.c.attempts, failed.c.max_attempts, failed.c.run_at
        ).add_cte(unlocked)

    def _detached(self, jobs: Table, chosen: ColumnElement[bool]) -> CTE:
        """Chosen rows of ours that were detached (replaced or removed) while we held them.

        Node's ``add_job``/``remove_job`` detach a locked keyed job: ``key`` cleared,
        ``updated_at`` set after our ``locked_at`` (the fetch never touches it). Such a
        job is never returned runnable: it was unstarted, so it is deleted.
        """
        return (
            delete(jobs)
            .where(
                chosen,
                jobs.c.locked_by == bindparam("worker_id", type_=Text),
                jobs.c.key.is_(None),
                jobs.c.updated_at > jobs.c.locked_at,
            )
            .returning(jobs.c.id, jobs.c.job_queue_id)
            .cte("detached_jobs")
        )

    def _release(
        self, chosen: ColumnElement[bool], queues_kept: ColumnElement[bool]
    ) -> Select[Any]:
        """Give back unstarted jobs of ours (attempt refunded), detached ones deleted.

        Returns ``(id, deleted)`` for each row released. Queues we hold are unlocked
        unless ``queues_kept`` says a job of ours still needs them.
        """
        jobs = self.schema.private_jobs
        queues = self.schema.private_job_queues
        worker_id = bindparam("worker_id", type_=Text)
        detached = self._detached(jobs, chosen)
        returned = (
            update(jobs)
            .where(
                chosen,
                jobs.c.locked_by == worker_id,
                jobs.c.id.not_in(select(detached.c.id)),
            )
            # The attempt counted at fetch never started.
            .values(
                attempts=func.greatest(0, jobs.c.attempts - 1), locked_by=null(), locked_at=null()
            )
            .returning(jobs.c.id, jobs.c.job_queue_id)
            .cte("returned_jobs")
        )
        released = (
            select(returned.c.id, returned.c.job_queue_id, false().label("deleted"))
            .union_all(select(detached.c.id, detached.c.job_queue_id, true()))
            .cte("released_jobs")
        )
        unlocked = (
            update(queues)
            .where(
                queues.c.locked_by == worker_id,
                or_(queues.c.id.in_(select(released.c.job_queue_id)), ~queues_kept),
            )
            .values(locked_by=null(), locked_at=null())
            .returning(queues.c.id)
            .cte("unlocked_queues")
        )
        return select(released.c.id, released.c.deleted).add_cte(unlocked)

    def _return_jobs(self) -> Select[Any]:
        jobs = self.schema.private_jobs
        chosen = jobs.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
        return self._release(chosen, queues_kept=true())

    def _reclaim(self) -> Select[Any]:
        """Every job and queue locked by us but unknown to us (a fetch's lost reply)."""
        jobs = self.schema.private_jobs
        queues = self.schema.private_job_queues
        known = bindparam("known", type_=ARRAY(BigInteger))
        worker_id = bindparam("worker_id", type_=Text)
        chosen = jobs.c.id != func.all(known)
        needed = exists().where(
            jobs.c.job_queue_id == queues.c.id,
            jobs.c.locked_by == worker_id,
            jobs.c.id == func.any(known),
        )
        return self._release(chosen, queues_kept=needed)

    def _claim_keyed(self) -> Select[Any]:
        """Of keyed jobs queued locally, delete the detached; the ids still ours to start."""
        jobs = self.schema.private_jobs
        ids = bindparam("ids", type_=ARRAY(BigInteger))
        detached = self._detached(jobs, jobs.c.id == any_(ids))
        kept = select(jobs.c.id).where(
            jobs.c.id == any_(ids),
            jobs.c.locked_by == bindparam("worker_id", type_=Text),
            jobs.c.id.not_in(select(detached.c.id)),
        )
        return kept.add_cte(detached)

    def _written(self) -> Select[Any]:
        """What became of rows whose outcome write may have been applied before its reply."""
        jobs = self.schema.private_jobs
        return select(jobs.c.id, jobs.c.locked_by, jobs.c.last_error).where(
            jobs.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
        )

    # -- maintenance ----------------------------------------------------------------

    def _sweep(self) -> Select[Any]:
        jobs = self.schema.private_jobs
        queues = self.schema.private_job_queues
        swept_jobs = (
            update(jobs)
            .where(lock_expired(jobs.c.locked_at))
            # A crashed attempt still counts: attempts is left alone.
            .values(
                locked_at=null(),
                locked_by=null(),
                run_at=func.greatest(jobs.c.run_at, func.now()),
            )
            .returning(jobs.c.id)
            .cte("swept_jobs")
        )
        swept_queues = (
            update(queues)
            .where(lock_expired(queues.c.locked_at))
            .values(locked_at=null(), locked_by=null())
            .returning(queues.c.id)
            .cte("swept_queues")
        )
        return select(
            select(func.count()).select_from(swept_jobs).scalar_subquery().label("jobs"),
            select(func.count()).select_from(swept_queues).scalar_subquery().label("queues"),
        )


def _delete_ours(jobs: Table) -> Delete:
    return delete(jobs).where(
        and_(
            jobs.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))),
            jobs.c.locked_by == bindparam("worker_id", type_=Text),
        )
    )
