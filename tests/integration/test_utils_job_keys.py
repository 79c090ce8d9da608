"""Job keys: upserts, the mode × state table of ``add_job``, and Node's race (#580)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine, text
from utils_fixtures import (
    InThread,
    fail_job,
    job_row,
    job_rows,
    lock_job,
    permafail_job,
    q,
    statement_log,
    wait_until_blocked,
)

from sqla_graphile import JobKeyMode, JobSpec, RawJobSpec, WorkerUtils

T0 = datetime(2031, 1, 1, tzinfo=timezone.utc)
T1 = datetime(2032, 2, 2, tzinfo=timezone.utc)

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema = fx.module_schema, fx.schema


def test_later_payload_replaces_earlier_and_revision_increments(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = [utils.add_raw_job("keyed", {"n": n}, JobSpec(job_key="same")) for n in range(4)]
    assert {job.id for job in jobs} == {jobs[0].id}
    assert [job.revision for job in jobs] == [0, 1, 2, 3]
    (row,) = job_rows(engine, schema)
    assert row["payload"] == {"n": 3}
    assert row["revision"] == 3


def test_the_mode_sequence_of_the_rust_suite(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    run_ats = [T0 + timedelta(days=d) for d in range(4)]
    modes = [
        JobKeyMode.REPLACE,
        JobKeyMode.PRESERVE_RUN_AT,
        JobKeyMode.UNSAFE_DEDUPE,
        JobKeyMode.REPLACE,
    ]
    jobs = [
        utils.add_raw_job(
            "m", {"a": i + 1}, JobSpec(job_key="seq", run_at=run_at, job_key_mode=mode)
        )
        for i, (run_at, mode) in enumerate(zip(run_ats, modes, strict=True))
    ]
    assert [job.revision for job in jobs] == [0, 1, 2, 3]
    assert [job.run_at for job in jobs] == [run_ats[0], run_ats[0], run_ats[0], run_ats[3]]
    assert [job.payload for job in jobs] == [{"a": 1}, {"a": 2}, {"a": 2}, {"a": 4}]
    assert len(job_rows(engine, schema)) == 1


def test_details_not_given_in_an_update_are_reset(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job(
        "r", {}, JobSpec(job_key="reset", queue_name="q", run_at=T0, max_attempts=3, priority=7)
    )
    job = utils.add_raw_job("r", {"x": 1}, JobSpec(job_key="reset"))
    db_now = job_rows(engine, schema)[0]["updated_at"]
    assert (job.queue_name, job.max_attempts, job.priority) == (None, 25, 0)
    assert job.run_at <= db_now


def test_an_update_can_move_a_keyed_job_to_another_task_and_queue(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("task_a", {}, JobSpec(job_key="mv", queue_name="qa"))
    moved = utils.add_raw_job("task_b", {}, JobSpec(job_key="mv", queue_name="qb"))
    assert moved.id == first.id
    assert (moved.task_identifier, moved.queue_name) == ("task_b", "qb")
    (row,) = job_rows(engine, schema)
    assert (row["task_identifier"], row["queue_name"]) == ("task_b", "qb")


# -- the mode × state table (protocol reference §3.2) ---------------------------------

STATES: dict[str, Callable[[Engine, str, int], None] | None] = {
    "waiting": lambda engine, schema, job_id: None,
    "retrying": fail_job,
    "locked": lock_job,
    "permanently_failed": permafail_job,
}


def _existing(engine: Engine, schema: str, state: str, payload: Any = None) -> dict[str, Any]:
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job(
        "old_task", payload or {"v": 1}, JobSpec(job_key="K", run_at=T0, max_attempts=5)
    )
    setter = STATES[state]
    assert setter is not None
    setter(engine, schema, job.id)
    row = job_row(engine, schema, job.id)
    assert row is not None
    return row


@pytest.mark.parametrize("mode", list(JobKeyMode))
def test_no_existing_job_inserts(engine: Engine, schema: str, mode: JobKeyMode) -> None:
    job = WorkerUtils(engine, schema).add_raw_job(
        "new_task", {"v": 2}, JobSpec(job_key="K", run_at=T1, job_key_mode=mode)
    )
    (row,) = job_rows(engine, schema)
    assert row["id"] == job.id
    assert (row["key"], row["payload"], row["run_at"], row["revision"]) == ("K", {"v": 2}, T1, 0)
    assert job.task_identifier == "new_task"


@pytest.mark.parametrize("state", ["waiting", "retrying"])
@pytest.mark.parametrize("mode", [JobKeyMode.REPLACE, JobKeyMode.PRESERVE_RUN_AT])
def test_an_unlocked_job_is_overwritten_in_place(
    engine: Engine, schema: str, state: str, mode: JobKeyMode
) -> None:
    old = _existing(engine, schema, state)
    job = WorkerUtils(engine, schema).add_raw_job(
        "new_task", {"v": 2}, JobSpec(job_key="K", run_at=T1, job_key_mode=mode)
    )
    (row,) = job_rows(engine, schema)
    assert job.id == row["id"] == old["id"]
    assert row["payload"] == {"v": 2}
    assert row["task_identifier"] == job.task_identifier == "new_task"
    assert (row["revision"], row["attempts"], row["last_error"]) == (1, 0, None)
    assert row["max_attempts"] == 25
    # Only a never-attempted job keeps its time, and only in preserve_run_at mode.
    kept = mode is JobKeyMode.PRESERVE_RUN_AT and state == "waiting"
    assert row["run_at"] == (T0 if kept else T1)
    assert job.run_at == row["run_at"]


@pytest.mark.parametrize("state", ["locked", "permanently_failed"])
@pytest.mark.parametrize("mode", [JobKeyMode.REPLACE, JobKeyMode.PRESERVE_RUN_AT])
def test_an_unavailable_job_gives_up_its_key_to_a_new_job(
    engine: Engine, schema: str, state: str, mode: JobKeyMode
) -> None:
    old = _existing(engine, schema, state)
    job = WorkerUtils(engine, schema).add_raw_job(
        "new_task", {"v": 2}, JobSpec(job_key="K", run_at=T1, job_key_mode=mode)
    )
    assert job.id != old["id"]
    assert (job.key, job.payload, job.run_at, job.revision, job.attempts) == (
        "K",
        {"v": 2},
        T1,
        0,
        0,
    )
    retired = job_row(engine, schema, old["id"])
    assert retired is not None
    assert retired["key"] is None
    assert retired["attempts"] == retired["max_attempts"] == 5
    assert retired["payload"] == {"v": 1}
    assert retired["locked_by"] == old["locked_by"]  # a running job keeps running
    assert len(job_rows(engine, schema)) == 2


@pytest.mark.parametrize("state", list(STATES))
def test_unsafe_dedupe_returns_the_existing_job_in_any_state(
    engine: Engine, schema: str, state: str
) -> None:
    old = _existing(engine, schema, state)
    job = WorkerUtils(engine, schema).add_raw_job(
        "new_task",
        {"v": 2},
        JobSpec(job_key="K", run_at=T1, job_key_mode=JobKeyMode.UNSAFE_DEDUPE),
    )
    (row,) = job_rows(engine, schema)
    assert job.id == row["id"] == old["id"]
    assert row["revision"] == job.revision == 1
    for column in ("payload", "run_at", "attempts", "max_attempts", "last_error", "locked_at"):
        assert row[column] == old[column], column
    assert row["key"] == "K"
    assert job.task_identifier == "old_task"


@pytest.mark.parametrize(
    ("state", "mode", "expected"),
    [
        ("waiting", JobKeyMode.REPLACE, [1, 2, 3]),
        ("waiting", JobKeyMode.PRESERVE_RUN_AT, [1, 2, 3]),
        ("retrying", JobKeyMode.REPLACE, [1, 2, 3]),
        ("waiting", JobKeyMode.UNSAFE_DEDUPE, [1, 2]),
        ("locked", JobKeyMode.REPLACE, [3]),
    ],
)
def test_array_payloads_concatenate_on_an_in_place_update(
    engine: Engine, schema: str, state: str, mode: JobKeyMode, expected: list[int]
) -> None:
    _existing(engine, schema, state, payload=[1, 2])
    job = WorkerUtils(engine, schema).add_raw_job(
        "new_task", [3], JobSpec(job_key="K", job_key_mode=mode)
    )
    assert job.payload == expected
    assert job_row(engine, schema, job.id)["payload"] == expected  # type: ignore[index]


def test_an_array_replaced_by_an_object_is_not_merged(engine: Engine, schema: str) -> None:
    _existing(engine, schema, "waiting", payload=[1, 2])
    job = WorkerUtils(engine, schema).add_raw_job("t", {"o": 1}, JobSpec(job_key="K"))
    assert job.payload == {"o": 1}


def test_batches_upsert_by_key_too(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_jobs(
        [RawJobSpec("b", {"n": i}, JobSpec(job_key=f"bk{i}")) for i in range(3)]
    )
    second = utils.add_raw_jobs(
        [RawJobSpec("b", {"n": 10 + i}, JobSpec(job_key=f"bk{i}")) for i in range(3)]
    )
    assert {job.id for job in first} == {job.id for job in second}
    assert {job.revision for job in second} == {1}
    assert sorted(row["payload"]["n"] for row in job_rows(engine, schema)) == [10, 11, 12]


# -- Node's race (#580): the keyed job is locked between detach and upsert -------------

RACE_KEY = "raced"


def _race(
    engine: Engine, schema: str, add: Callable[[Any], Any]
) -> tuple[dict[str, Any], Any, int]:
    """Lock the keyed job in a concurrent transaction while ``add`` waits on its row.

    Session B updates the waiting keyed job to "locked by a worker" and keeps its
    transaction open. ``add`` (on connection A) finds the job available in its detach
    step, so it does not detach it, and blocks in the upsert on B's row lock. B commits;
    the upsert's "only if not locked" condition now fails: the first attempt writes
    nothing, exactly Node's race. Returns the original row, ``add``'s result and the
    number of ``add_job``/``add_jobs`` statements A sent.
    """
    utils = WorkerUtils(engine, schema)
    original = utils.add_raw_job("raced_task", {"v": 1}, JobSpec(job_key=RACE_KEY))
    with engine.connect() as session_b, engine.connect() as connection_a:
        pid = connection_a.execute(text("select pg_backend_pid()")).scalar_one()
        session_b.execute(
            text(
                f"update {q(schema)}._private_jobs set locked_at = now(), "
                "locked_by = 'racing-worker', attempts = attempts + 1 where key = :k"
            ),
            {"k": RACE_KEY},
        )
        with statement_log(connection_a) as log:
            adding = InThread(lambda: add(connection_a))
            wait_until_blocked(engine, pid)
            session_b.commit()
            result = adding.join()
            connection_a.commit()
        calls = len(log.matching('"add_job"(')) + len(log.matching('"add_jobs"('))
    row = job_row(engine, schema, original.id)
    assert row is not None
    return row, result, calls


def test_the_race_is_real_for_the_sql_function(engine: Engine, schema: str) -> None:
    """Node's ``add_job`` called directly returns an all-NULL row in this scenario."""

    def add(connection: Any) -> Any:
        return connection.execute(
            text(f"select id from {q(schema)}.add_job('raced_task', '{{}}', job_key => :k)"),
            {"k": RACE_KEY},
        ).scalar_one()

    original, result, _calls = _race(engine, schema, add)
    assert result is None
    # Nothing was written for the add: the only row is the locked original.
    assert [row["id"] for row in job_rows(engine, schema)] == [original["id"]]
    assert original["key"] == RACE_KEY


def test_add_job_retries_the_race_and_returns_a_job(engine: Engine, schema: str) -> None:
    def add(connection: Any) -> Any:
        return WorkerUtils(connection, schema).add_raw_job(
            "raced_task", {"v": 2}, JobSpec(job_key=RACE_KEY)
        )

    original, job, calls = _race(engine, schema, add)
    assert calls == 2  # the first attempt lost the race, the second won
    assert job is not None
    assert job.id != original["id"]
    assert (job.key, job.payload, job.task_identifier, job.revision) == (
        RACE_KEY,
        {"v": 2},
        "raced_task",
        0,
    )
    # The running original was retired the normal way: it will not run again.
    assert original["key"] is None
    assert original["attempts"] == original["max_attempts"]
    assert original["locked_by"] == "racing-worker"


def test_add_raw_jobs_retries_only_the_raced_specs(engine: Engine, schema: str) -> None:
    def add(connection: Any) -> Any:
        return WorkerUtils(connection, schema).add_raw_jobs(
            [
                RawJobSpec("plain_task", {"p": 1}),
                RawJobSpec("raced_task", {"v": 2}, JobSpec(job_key=RACE_KEY)),
            ]
        )

    original, jobs, calls = _race(engine, schema, add)
    assert calls == 2
    assert sorted(job.task_identifier for job in jobs) == ["plain_task", "raced_task"]
    keyed = next(job for job in jobs if job.key == RACE_KEY)
    assert keyed.id != original["id"]
    assert original["key"] is None
    # Exactly one unkeyed job was written: the retry did not resend it.
    rows = job_rows(engine, schema)
    assert len(rows) == 3
    assert sum(1 for row in rows if row["task_identifier"] == "plain_task") == 1
