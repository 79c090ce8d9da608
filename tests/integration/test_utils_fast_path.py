"""The fast path of unkeyed jobs is indistinguishable from the SQL functions.

Once a utils object knows the ids of a task identifier (and queue), it inserts unkeyed
jobs with one direct ``INSERT`` instead of calling ``add_job``/``add_jobs``. These tests
add the same specs both ways and compare what is stored, returned and notified; they
delete the cached rows behind its back; and they check errors and result order.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from utils_fixtures import (
    ASYNC_DRIVERS,
    SYNC_DRIVERS,
    Listener,
    call,
    driver_url,
    execute,
    job_rows,
    q,
    scalar,
    statement_log,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    CleanupTask,
    Job,
    JobSpec,
    PayloadNotSerializable,
    RawJobSpec,
    WorkerUtils,
    migrate,
)
from sqla_graphile._urls import async_engine_from_url, engine_from_url
from sqla_graphile.errors import QueueNameTooLong, TaskIdentifierTooLong
from sqla_graphile.schema import quote_schema

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema, listener = fx.module_schema, fx.schema, fx.listener

LATER = datetime(2031, 5, 4, 3, 2, 1, 123456, tzinfo=timezone.utc)
ELSEWHERE = datetime(2030, 1, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30)))
NOTIFICATION = re.compile(r'\{"r":[0-9.e+-]+,"count":(-?\d+)\}')

SPECS = [
    RawJobSpec("diff_a", None),
    RawJobSpec("diff_a", {}),
    RawJobSpec("diff_a", {"n": 1, "s": 'é ☃ "q"', "deep": {"l": [1, 2.5, None, True]}}),
    RawJobSpec("diff_a", [1, "two", {"three": 3}]),
    RawJobSpec("diff_a", "a string"),
    RawJobSpec("diff_a", 42),
    RawJobSpec("diff_a", {"path": "C:\\u0000", "tab": "\t"}),
    RawJobSpec("diff_b", {"n": 2}, JobSpec(run_at=LATER)),
    RawJobSpec("diff_b", {"n": 3}, JobSpec(run_at=ELSEWHERE)),
    RawJobSpec("diff_b", {"n": 4}, JobSpec(priority=-5, max_attempts=3)),
    RawJobSpec("diff_b", {"n": 5}, JobSpec(priority=32767, max_attempts=32767)),
    RawJobSpec("diff_a", {"n": 6}, JobSpec(flags=[])),
    RawJobSpec("diff_a", {"n": 7}, JobSpec(flags=["one"])),
    RawJobSpec("diff_a", {"n": 8}, JobSpec(flags=["b", "a", "b", "c d", 'q"uote'])),
    RawJobSpec("diff_a", {"n": 9}, JobSpec(queue_name="diff_q1")),
    RawJobSpec(
        "diff_b",
        {"n": 10},
        JobSpec(queue_name="diff_q2", priority=1, run_at=LATER, flags=["x"], max_attempts=1),
    ),
    # Twins of earlier specs: alike rows must still come back in input order.
    RawJobSpec("diff_a", {"n": 1, "s": 'é ☃ "q"', "deep": {"l": [1, 2.5, None, True]}}),
    RawJobSpec("diff_b", {"n": 2}),
    RawJobSpec("diff_b", {"n": 2}, JobSpec(priority=3)),
]
IDENTIFIERS = sorted({spec.identifier for spec in SPECS})
QUEUES = sorted({spec.spec.queue_name for spec in SPECS if spec.spec.queue_name})


@pytest.fixture
def twin(engine: Engine) -> Iterator[str]:
    """A second migrated worker schema, for adding the same specs the other way."""
    name = f"gw_{secrets.token_hex(4)}"
    migrate(engine, schema=name)
    yield name
    execute(engine, f"drop schema if exists {quote_schema(name)} cascade")


def warm(utils: WorkerUtils, engine: Engine) -> None:
    """Teach ``utils`` the ids of every identifier and queue of SPECS; leave no job."""
    for identifier in IDENTIFIERS:
        utils.add_raw_job(identifier)
    for queue in QUEUES:
        utils.add_raw_job(IDENTIFIERS[0], None, JobSpec(queue_name=queue))
    execute(engine, f"delete from {q(utils.schema)}._private_jobs")


def stored(engine: Engine, schema: str, job: Job) -> dict[str, Any]:
    """What the database holds for ``job``, minus what differs between two inserts."""
    with engine.connect() as connection:
        row = (
            connection.execute(
                text(
                    "select j.*, j.payload::text as payload_text, t.identifier, qu.queue_name, "
                    "j.run_at = j.created_at as run_at_is_now, "
                    "j.updated_at = j.created_at as updated_is_created "
                    f"from {q(schema)}._private_jobs j "
                    f"join {q(schema)}._private_tasks t on t.id = j.task_id "
                    f"left join {q(schema)}._private_job_queues qu on qu.id = j.job_queue_id "
                    "where j.id = :id"
                ),
                {"id": job.id},
            )
            .mappings()
            .one()
        )
    # Everything a Job shows must be what is stored.
    assert job.task_identifier == row["identifier"]
    assert job.queue_name == row["queue_name"]
    assert job.task_id == row["task_id"]
    assert job.job_queue_id == row["job_queue_id"]
    assert job.payload == json.loads(row["payload_text"])
    for name in ("priority", "run_at", "attempts", "max_attempts", "last_error", "key"):
        assert getattr(job, name) == row[name], name
    for name in ("created_at", "updated_at", "locked_at", "locked_by", "revision"):
        assert getattr(job, name) == row[name], name
    assert job.flags == (frozenset(row["flags"]) if row["flags"] is not None else None)
    return {
        "identifier": row["identifier"],
        "queue_name": row["queue_name"],
        "payload": row["payload_text"],
        "priority": row["priority"],
        "run_at": None if row["run_at_is_now"] else row["run_at"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "last_error": row["last_error"],
        "key": row["key"],
        "locked_at": row["locked_at"],
        "locked_by": row["locked_by"],
        "revision": row["revision"],
        "flags": row["flags"],
        "is_available": row["is_available"],
        "updated_is_created": row["updated_is_created"],
    }


def function_calls(log: fx.StatementLog) -> list[str]:
    return log.matching('."add_job')


def counts(notifications: list[str]) -> list[int]:
    found = []
    for payload in notifications:
        match = NOTIFICATION.fullmatch(payload)
        assert match, payload
        found.append(int(match.group(1)))
    return found


# -- the differential tests -------------------------------------------------------------


def test_single_adds_store_what_the_sql_function_stores(
    engine: Engine, schema: str, twin: str, listener: Listener
) -> None:
    fast = WorkerUtils(engine, schema)
    warm(fast, engine)
    listener.drain()
    with statement_log(engine) as log:
        fast_jobs = [fast.add_raw_job(s.identifier, s.payload, s.spec) for s in SPECS]
    assert function_calls(log) == []  # every add took the fast path
    assert counts(listener.drain()) == [1] * len(SPECS)

    # A fresh utils knows no id: each add goes through the add_job function.
    with statement_log(engine) as log:
        sql_jobs = [
            WorkerUtils(engine, twin).add_raw_job(s.identifier, s.payload, s.spec) for s in SPECS
        ]
    assert len(function_calls(log)) == len(SPECS)
    assert counts(listener.drain()) == [1] * len(SPECS)

    assert [stored(engine, schema, job) for job in fast_jobs] == [
        stored(engine, twin, job) for job in sql_jobs
    ]
    assert [job.payload for job in fast_jobs] == [
        {} if s.payload is None else s.payload for s in SPECS
    ]


def test_batches_store_what_the_sql_function_stores(
    engine: Engine, schema: str, twin: str, listener: Listener
) -> None:
    fast = WorkerUtils(engine, schema)
    warm(fast, engine)
    listener.drain()
    with statement_log(engine) as log:
        fast_jobs = fast.add_raw_jobs(SPECS)
    assert function_calls(log) == []
    assert counts(listener.drain()) == [len(SPECS)]  # one notification, as Node's

    with statement_log(engine) as log:
        sql_jobs = WorkerUtils(engine, twin).add_raw_jobs(SPECS)
    assert len(function_calls(log)) == 1
    assert counts(listener.drain()) == [len(SPECS)]

    fast_rows = [stored(engine, schema, job) for job in fast_jobs]
    assert fast_rows == [stored(engine, twin, job) for job in sql_jobs]
    # Both in input order.
    expected = [{} if s.payload is None else s.payload for s in SPECS]
    assert [job.payload for job in fast_jobs] == expected
    assert [job.payload for job in sql_jobs] == expected
    assert [job.priority for job in sql_jobs] == [s.spec.priority or 0 for s in SPECS]
    assert [job.id for job in fast_jobs] == sorted(job.id for job in fast_jobs)


def test_the_fast_path_stores_a_literal_backslash_u0000_and_refuses_a_nul(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job("nul")
    typed = "C:\\u0000"  # a real backslash, then "u0000"
    job = utils.add_raw_job("nul", {"path": typed, "even": "\\\\u0000"})
    assert job.payload == {"path": typed, "even": "\\\\u0000"}
    assert (
        scalar(
            engine,
            f"select payload->>'path' from {q(schema)}._private_jobs where id = :i",
            i=job.id,
        )
        == typed
    )
    for bad in ({"s": "a\x00b"}, {"s": "\\\x00"}, {"k\x00": 1}, ["\x00"]):
        with pytest.raises(PayloadNotSerializable):
            utils.add_raw_job("nul", bad)
        with pytest.raises(PayloadNotSerializable):
            utils.add_raw_jobs([RawJobSpec("nul", {}), RawJobSpec("nul", bad)])
    assert len(job_rows(engine, schema)) == 2


# -- rows deleted behind the cache's back -----------------------------------------------


def test_a_garbage_collected_task_falls_back_to_the_sql_function(
    engine: Engine, schema: str, listener: Listener
) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("collected", {"n": 1})
    utils.complete_jobs([first.id])
    utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
    assert scalar(engine, f"select count(*) from {q(schema)}._private_tasks") == 0
    listener.drain()

    with statement_log(engine) as log:
        second = utils.add_raw_job("collected", {"n": 2})
    assert len(function_calls(log)) == 1  # the fast path found no task row, then the function
    rows = job_rows(engine, schema)
    assert [(row["id"], row["task_identifier"]) for row in rows] == [(second.id, "collected")]
    assert second.task_id == rows[0]["task_id"] != first.task_id
    assert second.task_identifier == "collected"
    assert counts(listener.drain()) == [1]  # nothing notified for the insert that was not

    # The cache now holds the new id: the next add is fast again.
    with statement_log(engine) as log:
        third = utils.add_raw_job("collected", {"n": 3})
    assert function_calls(log) == []
    assert third.task_id == second.task_id


def test_a_garbage_collected_queue_falls_back_to_the_sql_function(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("queued", {}, JobSpec(queue_name="gc_q"))
    utils.complete_jobs([first.id])
    utils.cleanup([CleanupTask.GC_JOB_QUEUES])
    second = utils.add_raw_job("queued", {}, JobSpec(queue_name="gc_q"))
    rows = job_rows(engine, schema)
    assert [(row["id"], row["queue_name"]) for row in rows] == [(second.id, "gc_q")]
    assert second.job_queue_id == rows[0]["job_queue_id"] != first.job_queue_id
    assert second.queue_name == "gc_q"


def test_a_batch_with_a_collected_task_falls_back_for_its_jobs_only(
    engine: Engine, schema: str, listener: Listener
) -> None:
    utils = WorkerUtils(engine, schema)
    kept = utils.add_raw_job("kept")
    gone = utils.add_raw_job("gone")
    utils.complete_jobs([gone.id])
    utils.cleanup([CleanupTask.GC_TASK_IDENTIFIERS])
    listener.drain()
    batch = [RawJobSpec("kept" if i % 3 else "gone", {"i": i}) for i in range(9)]
    with statement_log(engine) as log:
        jobs = utils.add_raw_jobs(batch)
    assert len(function_calls(log)) == 1
    assert [job.payload for job in jobs] == [{"i": i} for i in range(9)]
    assert [job.task_identifier for job in jobs] == [spec.identifier for spec in batch]
    by_id = {row["id"]: row for row in job_rows(engine, schema)}
    for job in jobs:
        assert by_id[job.id]["task_identifier"] == job.task_identifier
        assert by_id[job.id]["task_id"] == job.task_id
    assert {job.task_id for job in jobs if job.task_identifier == "kept"} == {kept.task_id}
    # The fast insert and the fallback each notify for their own jobs.
    assert sorted(counts(listener.drain())) == [3, 6]


def test_a_rolled_back_task_row_is_recreated(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    with Session(engine) as session:
        session.begin()
        rolled = utils.using(session).add_raw_job("rolled_back")
        session.rollback()
    job = utils.add_raw_job("rolled_back")  # the cached id never existed for others
    rows = job_rows(engine, schema)
    assert [row["id"] for row in rows] == [job.id]
    assert job.task_id == rows[0]["task_id"] != rolled.task_id


# -- errors -----------------------------------------------------------------------------

# Numbers out of range never get this far: JobSpec refuses them (see test_misuse.py).
ERRORS = [
    pytest.param("t" * 129, JobSpec(), TaskIdentifierTooLong, False, id="identifier"),
    pytest.param("warm", JobSpec(queue_name="q" * 129), QueueNameTooLong, False, id="queue"),
]


@pytest.mark.parametrize(("identifier", "spec", "error", "fast"), ERRORS)
def test_errors_are_named_alike_on_both_paths(
    engine: Engine, schema: str, identifier: str, spec: JobSpec, error: type, fast: bool
) -> None:
    cold_single = WorkerUtils(engine, schema)
    with pytest.raises(error):
        cold_single.add_raw_job(identifier, {}, spec)
    with pytest.raises(error):
        WorkerUtils(engine, schema).add_raw_jobs([RawJobSpec(identifier, {}, spec)])

    warmed = WorkerUtils(engine, schema)
    warmed.add_raw_job("warm")
    execute(engine, f"delete from {q(schema)}._private_jobs")
    with statement_log(engine) as log:
        with pytest.raises(error):
            warmed.add_raw_job(identifier, {}, spec)
        with pytest.raises(error):
            warmed.add_raw_jobs([RawJobSpec("warm", {}), RawJobSpec(identifier, {}, spec)])
    assert (function_calls(log) == []) is fast
    assert job_rows(engine, schema) == []


# -- order of results ---------------------------------------------------------------------


def test_mixed_batches_come_back_in_input_order(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    utils.add_raw_job("mixed_z", {"n": -1}, JobSpec(job_key="existing"))
    batch = [
        RawJobSpec("mixed_b", {"n": 0}),
        RawJobSpec("mixed_a", {"n": 1}, JobSpec(job_key="k1")),
        RawJobSpec("mixed_c", {"n": 2}, JobSpec(queue_name="mq")),
        RawJobSpec("mixed_a", {"n": 3}, JobSpec(job_key="existing", priority=2)),
        RawJobSpec("mixed_b", {"same": True}, JobSpec(run_at=LATER)),
        RawJobSpec("mixed_b", {"same": True}),
        RawJobSpec("mixed_b", {"same": True}, JobSpec(priority=-1)),
        RawJobSpec("mixed_b", {"same": True}, JobSpec(flags=["f"])),
        RawJobSpec("mixed_a", {"n": 8}),
    ]
    for attempt in range(2):  # cold (new names), then warm (keys keep it on add_jobs)
        jobs = utils.add_raw_jobs(batch)
        assert [job.task_identifier for job in jobs] == [spec.identifier for spec in batch]
        assert [job.payload for job in jobs] == [spec.payload for spec in batch]
        assert [job.key for job in jobs] == [spec.spec.job_key for spec in batch]
        assert [job.priority for job in jobs] == [spec.spec.priority or 0 for spec in batch]
        assert jobs[4].run_at == LATER and jobs[5].run_at != LATER
        assert jobs[7].flags == {"f"} and jobs[5].flags is None
        assert jobs[3].revision == attempt + 1 and jobs[1].revision == attempt
        for job in jobs:
            stored(engine, schema, job)

    unkeyed = [spec for spec in batch if spec.spec.job_key is None]
    with statement_log(engine) as log:
        jobs = utils.add_raw_jobs(unkeyed * 3)
    assert function_calls(log) == []
    assert [job.payload for job in jobs] == [spec.payload for spec in unkeyed * 3]
    assert [job.id for job in jobs] == sorted(job.id for job in jobs)


# -- every driver ------------------------------------------------------------------------


@pytest.fixture(params=[*SYNC_DRIVERS, *ASYNC_DRIVERS])
async def driver_utils(
    request: pytest.FixtureRequest, database_url: str, schema: str
) -> AsyncIterator[Any]:
    """One utils on one driver's engine, for the schema."""
    url = driver_url(database_url, request.param)
    if request.param in SYNC_DRIVERS:
        sync_engine = engine_from_url(url)
        yield WorkerUtils(sync_engine, schema)
        sync_engine.dispose()
    else:
        async_engine = async_engine_from_url(url)
        yield AsyncWorkerUtils(async_engine, schema)
        await async_engine.dispose()


async def test_the_fast_path_on_every_driver(
    driver_utils: Any, engine: Engine, schema: str
) -> None:
    utils = driver_utils
    for identifier in IDENTIFIERS:
        await call(utils.add_raw_job(identifier))
    for queue in QUEUES:
        await call(utils.add_raw_job(IDENTIFIERS[0], None, JobSpec(queue_name=queue)))
    execute(engine, f"delete from {q(schema)}._private_jobs")
    singles = [await call(utils.add_raw_job(s.identifier, s.payload, s.spec)) for s in SPECS]
    batch = await call(utils.add_raw_jobs(SPECS))
    expected = [{} if s.payload is None else s.payload for s in SPECS]
    assert [job.payload for job in singles] == expected
    assert [job.payload for job in batch] == expected
    assert [stored(engine, schema, job) for job in singles] == [
        stored(engine, schema, job) for job in batch
    ]
    assert scalar(engine, f"select count(*) from {q(schema)}._private_tasks") == len(IDENTIFIERS)
