"""Administrative actions: complete, fail, reschedule, remove, force-unlock, cleanup."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from utils_fixtures import (
    execute,
    job_row,
    job_rows,
    lock_job,
    permafail_job,
    q,
    scalar,
    statement_log,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    CleanupTask,
    JobSpec,
    RawJobSpec,
    RescheduleJobOptions,
    WorkerUtils,
)

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema = fx.module_schema, fx.schema


@dataclass
class Selection:
    """The Rust suite's "selection of jobs": five jobs an hour ahead, one failed, one locked."""

    failed: int
    regular1: int
    locked: int
    regular2: int
    untouched: int

    @property
    def ids(self) -> list[int]:
        return [self.failed, self.regular1, self.locked, self.regular2, self.untouched]


@pytest.fixture
def selection(engine: Engine, schema: str) -> Selection:
    run_at = datetime.now(timezone.utc) + timedelta(hours=1)
    jobs = WorkerUtils(engine, schema).add_raw_jobs(
        [RawJobSpec("job3", {"a": i}, JobSpec(run_at=run_at, max_attempts=4)) for i in range(5)]
    )
    ids = sorted(job.id for job in jobs)
    chosen = Selection(*ids)
    permafail_job(engine, schema, chosen.failed, "Failed forever")
    execute(
        engine,
        f"update {q(schema)}._private_jobs set locked_at = now(), locked_by = 'test' "
        "where id = :id",
        id=chosen.locked,
    )
    return chosen


def _asked(selection: Selection) -> list[int]:
    return [selection.failed, selection.regular1, selection.locked, selection.regular2]


def test_complete_jobs_leaves_locked_and_other_jobs(
    engine: Engine, schema: str, selection: Selection
) -> None:
    completed = WorkerUtils(engine, schema).complete_jobs(_asked(selection))
    assert sorted(job.id for job in completed) == [
        selection.failed,
        selection.regular1,
        selection.regular2,
    ]
    assert {job.task_identifier for job in completed} == {"job3"}
    assert [row["id"] for row in job_rows(engine, schema)] == [
        selection.locked,
        selection.untouched,
    ]


def test_permanently_fail_jobs_leaves_locked_and_other_jobs(
    engine: Engine, schema: str, selection: Selection
) -> None:
    failed = WorkerUtils(engine, schema).permanently_fail_jobs(_asked(selection), "TESTING!")
    assert sorted(job.id for job in failed) == [
        selection.failed,
        selection.regular1,
        selection.regular2,
    ]
    for job in failed:
        assert job.last_error == "TESTING!"
        assert job.attempts == job.max_attempts == 4
    rows = {row["id"]: row for row in job_rows(engine, schema)}
    for job_id in (selection.locked, selection.untouched):
        assert rows[job_id]["attempts"] == 0
        assert rows[job_id]["last_error"] is None
    assert rows[selection.regular1]["last_error"] == "TESTING!"


def test_permanently_fail_without_a_reason_uses_nodes_message(
    engine: Engine, schema: str, selection: Selection
) -> None:
    (job,) = WorkerUtils(engine, schema).permanently_fail_jobs([selection.regular1])
    assert job.last_error == "Manually marked as failed"


def test_reschedule_jobs_changes_only_the_given_fields(
    engine: Engine, schema: str, selection: Selection
) -> None:
    before = {row["id"]: row for row in job_rows(engine, schema)}
    run_at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=60)
    rescheduled = WorkerUtils(engine, schema).reschedule_jobs(
        _asked(selection), RescheduleJobOptions(run_at=run_at, attempts=1)
    )
    assert sorted(job.id for job in rescheduled) == [
        selection.failed,
        selection.regular1,
        selection.regular2,
    ]
    for job in rescheduled:
        assert (job.run_at, job.attempts) == (run_at, 1)
        assert job.priority == before[job.id]["priority"]
        assert job.max_attempts == before[job.id]["max_attempts"]
        assert job.last_error == ("Failed forever" if job.id == selection.failed else None)
    after = {row["id"]: row for row in job_rows(engine, schema)}
    for job_id in (selection.locked, selection.untouched):
        assert after[job_id] == before[job_id]


def test_reschedule_without_run_at_makes_jobs_runnable_now(
    engine: Engine, schema: str, selection: Selection
) -> None:
    rescheduled = WorkerUtils(engine, schema).reschedule_jobs(
        [selection.regular1, selection.regular2], RescheduleJobOptions(priority=5)
    )
    db_now = scalar(engine, "select now()")
    for job in rescheduled:
        assert job.run_at <= db_now
        assert job.priority == 5
        assert job.attempts == 0
    untouched = job_row(engine, schema, selection.untouched)
    assert untouched is not None and untouched["run_at"] > db_now


def test_reschedule_takes_a_timedelta(engine: Engine, schema: str, selection: Selection) -> None:
    (job,) = WorkerUtils(engine, schema).reschedule_jobs(
        [selection.regular1], RescheduleJobOptions(run_at=timedelta(days=3), max_attempts=9)
    )
    db_now = scalar(engine, "select now()")
    assert db_now + timedelta(days=2) < job.run_at < db_now + timedelta(days=4)
    assert job.max_attempts == 9


def test_reschedule_can_revive_a_permanently_failed_job(
    engine: Engine, schema: str, selection: Selection
) -> None:
    (job,) = WorkerUtils(engine, schema).reschedule_jobs(
        [selection.failed], RescheduleJobOptions(attempts=0)
    )
    assert not job.is_permanently_failed
    assert scalar(
        engine, f"select is_available from {q(schema)}._private_jobs where id = :i", i=job.id
    )


def test_a_lock_older_than_four_hours_counts_as_abandoned(
    engine: Engine, schema: str, selection: Selection
) -> None:
    execute(
        engine,
        f"update {q(schema)}._private_jobs set locked_at = now() - interval '4 hours 1 minute' "
        "where id = :id",
        id=selection.locked,
    )
    completed = WorkerUtils(engine, schema).complete_jobs([selection.locked])
    assert [job.id for job in completed] == [selection.locked]


def test_unknown_ids_change_nothing(engine: Engine, schema: str, selection: Selection) -> None:
    utils = WorkerUtils(engine, schema)
    assert utils.complete_jobs([10**12]) == []
    assert utils.complete_jobs([]) == []
    assert utils.permanently_fail_jobs([10**12]) == []
    assert utils.reschedule_jobs([10**12], RescheduleJobOptions(priority=1)) == []
    assert len(job_rows(engine, schema)) == 5


async def test_async_admin_actions(
    async_engine: AsyncEngine, engine: Engine, schema: str, selection: Selection
) -> None:
    utils = AsyncWorkerUtils(async_engine, schema)
    failed = await utils.permanently_fail_jobs([selection.regular1, selection.locked], "x")
    assert [job.id for job in failed] == [selection.regular1]
    rescheduled = await utils.reschedule_jobs([selection.regular2, selection.locked])
    assert [job.id for job in rescheduled] == [selection.regular2]
    completed = await utils.complete_jobs([selection.untouched, selection.locked])
    assert [job.id for job in completed] == [selection.untouched]
    assert len(job_rows(engine, schema)) == 4


# -- remove_job -----------------------------------------------------------------------


def test_remove_job_deletes_a_waiting_keyed_job(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job("r", {}, JobSpec(job_key="to-remove"))
    other = utils.add_raw_job("r", {}, JobSpec(job_key="to-keep"))
    removed = utils.remove_job("to-remove")
    assert removed is not None and removed.id == job.id
    assert removed.task_identifier == "r"
    assert [row["id"] for row in job_rows(engine, schema)] == [other.id]


def test_remove_job_stops_a_running_job_from_retrying(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job("r", {}, JobSpec(job_key="running"))
    lock_job(engine, schema, job.id)
    removed = utils.remove_job("running")
    assert removed is not None and removed.id == job.id
    row = job_row(engine, schema, job.id)
    assert row is not None
    assert row["key"] is None
    assert row["attempts"] == row["max_attempts"]
    assert row["locked_by"] == "test-worker"  # it finishes, but never runs again
    # The key is free: a new job with it is a new row.
    assert utils.add_raw_job("r", {}, JobSpec(job_key="running")).id != job.id


def test_remove_job_of_an_unknown_key_returns_none(engine: Engine, schema: str) -> None:
    assert WorkerUtils(engine, schema).remove_job("nobody") is None


# -- force_unlock_workers -------------------------------------------------------------


def test_force_unlock_workers_unlocks_exactly_those_workers(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    owners = ["worker1", "worker2", "worker3", None, "worker2"]
    queues = ["test", "test2", "test3", None, "test2"]
    jobs = utils.add_raw_jobs(
        [RawJobSpec("u", {"i": i}, JobSpec(queue_name=queues[i % 5])) for i in range(10)]
    )
    by_index = {job.payload["i"]: job for job in jobs}
    for i, job in by_index.items():
        owner = owners[i % 5]
        if owner is not None:
            lock_job(engine, schema, job.id, owner)
    for queue, owner in [("test", "worker1"), ("test2", "worker2"), ("test3", "worker3")]:
        execute(
            engine,
            f"update {q(schema)}._private_job_queues set locked_at = now(), locked_by = :w "
            "where queue_name = :q",
            w=owner,
            q=queue,
        )
    before = {row["id"]: row for row in job_rows(engine, schema)}

    utils.force_unlock_workers(["worker2", "worker3"])

    for row in job_rows(engine, schema):
        was = before[row["id"]]
        if was["locked_by"] in ("worker2", "worker3"):
            assert (row["locked_at"], row["locked_by"]) == (None, None)
            assert (row["attempts"], row["run_at"]) == (was["attempts"], was["run_at"])
        else:
            assert (row["locked_at"], row["locked_by"]) == (was["locked_at"], was["locked_by"])
    locked_queues = scalar(
        engine,
        f"select array_agg(queue_name order by queue_name) from {q(schema)}._private_job_queues "
        "where locked_at is not null",
    )
    assert locked_queues == ["test"]


def test_force_unlock_of_no_workers_sends_nothing(engine: Engine, schema: str) -> None:
    with statement_log(engine) as log:
        WorkerUtils(engine, schema).force_unlock_workers([])
    assert log.statements == []


# -- cleanup --------------------------------------------------------------------------


def _identifiers(engine: Engine, schema: str) -> list[str]:
    return list(
        scalar(
            engine,
            f"select coalesce(array_agg(identifier order by identifier), '{{}}') "
            f"from {q(schema)}._private_tasks",
        )
    )


def _queues(engine: Engine, schema: str) -> list[str]:
    return list(
        scalar(
            engine,
            f"select coalesce(array_agg(queue_name order by queue_name), '{{}}') "
            f"from {q(schema)}._private_job_queues",
        )
    )


def test_gc_task_identifiers_keeps_referenced_and_known(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = utils.add_raw_jobs([RawJobSpec(name, {}) for name in ("t1", "t2", "t3", "idle")])
    idle_task_id = next(job.task_id for job in jobs if job.task_identifier == "idle")
    utils.complete_jobs([job.id for job in jobs if job.task_identifier in ("t2", "idle")])

    WorkerUtils(engine, schema, known_identifiers={"idle"}).cleanup(
        [CleanupTask.GC_TASK_IDENTIFIERS]
    )
    assert _identifiers(engine, schema) == ["idle", "t1", "t3"]
    # A known identifier keeps its id, so a Node worker's cached id stays right.
    assert (
        scalar(engine, f"select id from {q(schema)}._private_tasks where identifier = 'idle'")
        == idle_task_id
    )

    utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
    assert _identifiers(engine, schema) == ["t1", "t3"]


def test_gc_task_identifiers_restores_a_known_identifier(engine: Engine, schema: str) -> None:
    WorkerUtils(engine, schema, known_identifiers={"registered"}).cleanup(["GC_TASK_IDENTIFIERS"])
    assert _identifiers(engine, schema) == ["registered"]


def test_gc_job_queues_with_unqueued_jobs_present(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = utils.add_raw_jobs(
        [
            RawJobSpec("g", {}, JobSpec(queue_name="used")),
            RawJobSpec("g", {}, JobSpec(queue_name="emptied")),
            RawJobSpec("g", {}, JobSpec(queue_name="locked_empty")),
            RawJobSpec("g", {}),  # no queue: job_queue_id IS NULL
        ]
    )
    utils.complete_jobs([job.id for job in jobs if job.queue_name in ("emptied", "locked_empty")])
    execute(
        engine,
        f"update {q(schema)}._private_job_queues set locked_at = now(), locked_by = 'w' "
        "where queue_name = 'locked_empty'",
    )
    utils.cleanup([CleanupTask.GC_JOB_QUEUES])
    # "emptied" is gone although an unqueued job exists (NOT IN would have kept it);
    # a locked queue is kept, as Node does.
    assert _queues(engine, schema) == ["locked_empty", "used"]


def test_delete_permanently_failed_jobs_only_unlocked(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = utils.add_raw_jobs([RawJobSpec("d", {"i": i}) for i in range(4)])
    failed, failed_locked, retrying, waiting = sorted(job.id for job in jobs)
    permafail_job(engine, schema, failed)
    permafail_job(engine, schema, failed_locked)
    lock_job(engine, schema, failed_locked)
    execute(engine, f"update {q(schema)}._private_jobs set attempts = 3 where id = :i", i=retrying)
    utils.cleanup([CleanupTask.DELETE_PERMANENTLY_FAILED_JOBS])
    assert [row["id"] for row in job_rows(engine, schema)] == [failed_locked, retrying, waiting]


def test_default_cleanup_collects_garbage_but_keeps_failed_jobs(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = utils.add_raw_jobs(
        [RawJobSpec("gone", {}, JobSpec(queue_name="q_gone")), RawJobSpec("failed", {})]
    )
    # SQL returns the rows of one add_jobs call in no guaranteed order.
    gone, failed = sorted(jobs, key=lambda job: job.task_identifier != "gone")
    utils.complete_jobs([gone.id])
    permafail_job(engine, schema, failed.id)
    utils.cleanup()
    assert _identifiers(engine, schema) == ["failed"]
    assert _queues(engine, schema) == []
    assert [row["id"] for row in job_rows(engine, schema)] == [failed.id]


def test_cleanup_refuses_an_unknown_task(engine: Engine, schema: str) -> None:
    with pytest.raises(ValueError):
        WorkerUtils(engine, schema).cleanup(["VACUUM_EVERYTHING"])


async def test_async_cleanup_and_remove(
    async_engine: AsyncEngine, engine: Engine, schema: str
) -> None:
    utils = AsyncWorkerUtils(async_engine, schema)
    job = await utils.add_raw_job("a", {}, JobSpec(job_key="k", queue_name="aq"))
    removed = await utils.remove_job("k")
    assert removed is not None and removed.id == job.id and removed.queue_name == "aq"
    await utils.cleanup([CleanupTask.GC_JOB_QUEUES, CleanupTask.GC_TASK_IDENTIFIERS])
    assert _queues(engine, schema) == []
    assert _identifiers(engine, schema) == []
    await utils.force_unlock_workers(["nobody"])
