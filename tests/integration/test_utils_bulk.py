"""``bulk_add_jobs`` / ``bulk_add_raw_jobs``: what ``add_jobs`` stores, answered by a count.

The count-returning calls take the same paths as ``add_raw_jobs`` (the direct ``INSERT``
of unkeyed jobs of known tasks, the ``add_jobs`` function otherwise) without building
``Job`` objects. These tests compare what they store and notify with the SQL function's,
delete cached rows behind their back, and check hooks and every driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from test_utils_fast_path import (
    LATER,
    SPECS,
    counts,
    driver_utils,
    function_calls,
    stored,
    twin,
    warm,
)
from utils_fixtures import Listener, call, execute, job_rows, q, statement_log

from sqla_graphile import (
    CleanupTask,
    Hooks,
    JobSpec,
    RawJobSpec,
    TaskHandler,
    WorkerContext,
    WorkerUtils,
)
from sqla_graphile.errors import DuplicateJobKeyInBatch
from sqla_graphile.hooks import Continue, JobAddContext

module_schema, schema, listener = fx.module_schema, fx.schema, fx.listener
__all__ = ["driver_utils", "twin"]  # fixtures used here, defined with the fast path's tests

OPTIONS = JobSpec(queue_name="bulk_q", priority=4, run_at=LATER, max_attempts=2, flags=["f"])


@dataclass
class Mail(TaskHandler):
    IDENTIFIER: ClassVar[str] = "bulk_mail"
    PRIORITY: ClassVar[int | None] = 9

    to: str

    def run(self, ctx: WorkerContext) -> None: ...


def stored_in_id_order(engine: Engine, utils: WorkerUtils) -> list[dict[str, Any]]:
    """What the schema holds, job by job in id order (``stored`` checks each job read)."""
    jobs = sorted(utils.list_jobs(limit=None), key=lambda job: job.id)
    return [stored(engine, utils.schema, job) for job in jobs]


def test_a_bulk_add_stores_and_notifies_what_the_sql_function_does(
    engine: Engine, schema: str, twin: str, listener: Listener
) -> None:
    fast = WorkerUtils(engine, schema)
    warm(fast, engine)
    listener.drain()
    with statement_log(engine) as log:
        assert fast.bulk_add_raw_jobs(SPECS) == len(SPECS)
    assert function_calls(log) == []  # the direct insert, as add_raw_jobs'
    assert counts(listener.drain()) == [len(SPECS)]

    with statement_log(engine) as log:
        sql_jobs = WorkerUtils(engine, twin).add_raw_jobs(SPECS)
    assert len(function_calls(log)) == 1
    assert counts(listener.drain()) == [len(SPECS)]
    # Ids ascend in input order, as add_raw_jobs returns the SQL function's jobs.
    assert stored_in_id_order(engine, fast) == [stored(engine, twin, job) for job in sql_jobs]


@pytest.mark.parametrize("spec", [JobSpec(), OPTIONS], ids=["defaults", "options"])
def test_a_batch_of_one_task_and_options_stores_what_the_sql_function_does(
    engine: Engine, schema: str, twin: str, listener: Listener, spec: JobSpec
) -> None:
    batch = [RawJobSpec("bulk_one", {"i": i, "s": "é"}, spec) for i in range(50)]
    fast = WorkerUtils(engine, schema)
    fast.add_raw_job("bulk_one", None, spec)  # teaches the ids
    execute(engine, f"delete from {q(schema)}._private_jobs")
    listener.drain()
    with statement_log(engine) as log:
        assert fast.bulk_add_raw_jobs(batch) == 50
        returned = fast.add_raw_jobs(batch)
    assert function_calls(log) == []
    assert counts(listener.drain()) == [50, 50]
    assert [job.payload for job in returned] == [job.payload for job in batch]

    sql_jobs = WorkerUtils(engine, twin).add_raw_jobs(batch)
    expected = [stored(engine, twin, job) for job in sql_jobs]
    assert stored_in_id_order(engine, fast) == expected * 2
    assert [stored(engine, schema, job) for job in returned] == expected


def test_a_bulk_add_with_a_collected_task_falls_back_for_its_jobs_only(
    engine: Engine, schema: str, listener: Listener
) -> None:
    utils = WorkerUtils(engine, schema)
    kept = utils.add_raw_job("kept")
    gone = utils.add_raw_job("gone")
    utils.complete_jobs([kept.id, gone.id])
    execute(engine, f"delete from {q(schema)}._private_tasks where identifier = 'gone'")
    listener.drain()
    batch = [RawJobSpec("kept" if i % 3 else "gone", {"i": i}) for i in range(9)]
    with statement_log(engine) as log:
        assert utils.bulk_add_raw_jobs(batch) == 9
    assert len(function_calls(log)) == 1
    rows = job_rows(engine, schema)
    assert sorted((row["payload"]["i"], row["task_identifier"]) for row in rows) == [
        (i, spec.identifier) for i, spec in enumerate(batch)
    ]
    assert {row["task_id"] for row in rows if row["task_identifier"] == "kept"} == {kept.task_id}
    assert sorted(counts(listener.drain())) == [3, 6]


def test_a_bulk_add_of_one_collected_task_goes_through_the_sql_function(
    engine: Engine, schema: str, listener: Listener
) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("collected", {}, JobSpec(queue_name="bulk_gc"))
    utils.complete_jobs([first.id])
    utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS, CleanupTask.GC_JOB_QUEUES])
    listener.drain()
    batch = [RawJobSpec("collected", {"i": i}, JobSpec(queue_name="bulk_gc")) for i in range(4)]
    with statement_log(engine) as log:
        assert utils.bulk_add_raw_jobs(batch) == 4
    assert len(function_calls(log)) == 1
    assert counts(listener.drain()) == [4]  # nothing notified for the insert that was not
    rows = job_rows(engine, schema)
    assert [(row["task_identifier"], row["queue_name"]) for row in rows] == [
        ("collected", "bulk_gc")
    ] * 4
    # The cache holds the new ids: the next batch is fast again.
    with statement_log(engine) as log:
        assert utils.bulk_add_raw_jobs(batch) == 4
    assert function_calls(log) == []


def test_keyed_and_new_jobs_go_through_the_sql_function(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    batch = [
        RawJobSpec("bulk_new", {"n": 1}),
        RawJobSpec("bulk_new", {"n": 2}, JobSpec(job_key="k")),
        RawJobSpec("bulk_new", {"n": 3}, JobSpec(job_key="k")),
    ]
    with pytest.raises(DuplicateJobKeyInBatch):  # as add_raw_jobs
        utils.bulk_add_raw_jobs(batch)
    assert utils.bulk_add_raw_jobs(batch[:2]) == 2
    assert utils.bulk_add_raw_jobs(batch[1:2]) == 1  # replaces the keyed job
    rows = job_rows(engine, schema)
    assert sorted(row["payload"]["n"] for row in rows) == [1, 2]
    assert utils.bulk_add_raw_jobs([]) == 0


def test_hooks_see_a_bulk_add_as_they_see_add_jobs(engine: Engine, schema: str) -> None:
    hooks = Hooks()
    seen: list[tuple[str, list[int]]] = []

    @hooks.job_add_context
    @contextmanager
    def adding(ctx: JobAddContext) -> Iterator[None]:
        yield
        seen.append((ctx.operation, [job.id for job in ctx.jobs]))

    hooks.before_job_schedule(lambda ctx: Continue({"stamped": ctx.payload}))
    utils = WorkerUtils(engine, schema, hooks=hooks)
    assert utils.bulk_add_raw_jobs([RawJobSpec("bulk_hooked", {"n": n}) for n in range(3)]) == 3
    assert utils.bulk_add_jobs([(Mail("a@example.com"), None)]) == 1
    rows = sorted(job_rows(engine, schema), key=lambda row: row["id"])
    assert [row["payload"] for row in rows] == [
        {"stamped": {"n": 0}},
        {"stamped": {"n": 1}},
        {"stamped": {"n": 2}},
        {"stamped": {"to": "a@example.com"}},
    ]
    ids = [row["id"] for row in rows]
    assert seen == [("bulk_add_raw_jobs", ids[:3]), ("bulk_add_jobs", ids[3:])]

    # Without job_add_context hooks the schedule hooks still run, on the count path.
    plain = Hooks()
    plain.before_job_schedule(lambda ctx: Continue({"plain": True}))
    assert (
        WorkerUtils(engine, schema, hooks=plain).bulk_add_raw_jobs(
            [RawJobSpec("bulk_hooked", {}), RawJobSpec("bulk_hooked", {})]
        )
        == 2
    )
    assert [row["payload"] for row in job_rows(engine, schema)].count({"plain": True}) == 2


async def test_bulk_adds_on_every_driver(driver_utils: Any, engine: Engine, schema: str) -> None:
    utils = driver_utils
    assert await call(utils.bulk_add_raw_jobs([RawJobSpec("bulk_drv", {"n": 0})])) == 1  # cold
    batch = [RawJobSpec("bulk_drv", {"n": n}, OPTIONS) for n in range(1, 6)]
    assert await call(utils.bulk_add_raw_jobs(batch)) == 5
    typed = [(Mail(f"{n}@example.com"), None) for n in range(3)]
    assert await call(utils.bulk_add_jobs(typed)) == 3
    assert await call(utils.bulk_add_jobs(typed)) == 3  # warm: the direct insert
    rows = job_rows(engine, schema)
    assert len(rows) == 12
    mails = [row for row in rows if row["task_identifier"] == "bulk_mail"]
    assert {row["priority"] for row in mails} == {9}  # the task's defaults apply
    options = [row for row in rows if row["payload"].get("n", 0) > 0]
    assert {(row["queue_name"], row["priority"], row["run_at"]) for row in options} == {
        ("bulk_q", 4, LATER)
    }
