"""Adding jobs: the seed's batch rules, typed tasks, payload encoding, returned ``Job``s."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from utils_fixtures import (
    Invoice,
    Measure,
    SendEmail,
    execute,
    job_rows,
    q,
    scalar,
    statement_log,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    Hooks,
    InvalidArgument,
    Job,
    JobKeyMode,
    JobSpec,
    PayloadNotSerializable,
    RawJobSpec,
    WorkerUtils,
)
from sqla_graphile._ops import ANALYZE_THRESHOLD

UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/nowhere?connect_timeout=2"
UNREACHABLE_ASYNC = "postgresql+psycopg_async://nobody@127.0.0.1:1/nowhere?connect_timeout=2"

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema = fx.module_schema, fx.schema


def assert_tz_aware(job: Job) -> None:
    for value in (job.run_at, job.created_at, job.updated_at):
        assert value.tzinfo is not None and value.utcoffset() is not None
    if job.locked_at is not None:
        assert job.locked_at.tzinfo is not None


# -- empty batches --------------------------------------------------------------------


def test_empty_batches_never_reach_the_database() -> None:
    unreachable = create_engine(UNREACHABLE)
    try:
        utils = WorkerUtils(unreachable, "graphile_worker")
        assert utils.add_jobs([]) == []
        assert utils.add_raw_jobs([]) == []
        assert utils.add_raw_jobs(iter(())) == []
        # The same engine fails as soon as anything is sent: the [] above sent nothing.
        with pytest.raises(OperationalError):
            utils.add_raw_job("x")
    finally:
        unreachable.dispose()


async def test_empty_async_batches_never_reach_the_database() -> None:
    unreachable = create_async_engine(UNREACHABLE_ASYNC)
    try:
        utils = AsyncWorkerUtils(unreachable, "graphile_worker")
        assert await utils.add_jobs([]) == []
        assert await utils.add_raw_jobs([]) == []
        with pytest.raises(OperationalError):
            await utils.add_raw_job("x")
    finally:
        await unreachable.dispose()


def test_empty_batches_send_no_statement_on_a_connection(engine: Engine, schema: str) -> None:
    with engine.connect() as connection, statement_log(connection) as log:
        utils = WorkerUtils(connection, schema)
        assert utils.add_jobs([]) == []
        assert utils.add_raw_jobs([]) == []
        assert log.statements == []
        utils.add_raw_job("probe")  # the listener does see statements
        assert log.matching("add_job")
        connection.rollback()


# -- UNSAFE_DEDUPE in a batch ---------------------------------------------------------


@pytest.mark.parametrize("mode", [JobKeyMode.UNSAFE_DEDUPE, "unsafe_dedupe"])
def test_unsafe_dedupe_in_a_batch_is_refused_before_any_write(
    engine: Engine, schema: str, mode: Any
) -> None:
    seen: list[str] = []
    hooks = Hooks()
    hooks.before_job_schedule(lambda ctx: seen.append(ctx.identifier) or None)
    utils = WorkerUtils(engine, schema, hooks=hooks)
    batch = [
        RawJobSpec("fresh_a", {"n": 1}),
        RawJobSpec("fresh_b", {"n": 2}, JobSpec(job_key="k", job_key_mode=mode)),
    ]
    with statement_log(engine) as log:
        with pytest.raises(InvalidArgument, match="UNSAFE_DEDUPE"):
            utils.add_raw_jobs(batch)
        with pytest.raises(InvalidArgument, match="UNSAFE_DEDUPE"):
            utils.add_jobs([(SendEmail("a@x"), JobSpec(job_key="k2", job_key_mode=mode))])
    assert log.statements == []
    assert seen == []
    assert job_rows(engine, schema) == []
    # Unlike the Rust port, not even the task identifiers were registered.
    assert scalar(engine, f"select count(*) from {q(schema)}._private_tasks") == 0


# -- PRESERVE_RUN_AT anywhere applies to the whole batch ------------------------------


def test_one_preserve_run_at_makes_the_whole_batch_preserve(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    first = datetime.now(timezone.utc) + timedelta(hours=1)
    second = first + timedelta(hours=5)
    originals = utils.add_raw_jobs(
        [RawJobSpec("t", {"v": i}, JobSpec(job_key=f"k{i}", run_at=first)) for i in range(3)]
    )
    assert [job.run_at for job in originals] == [first] * 3

    updated = utils.add_raw_jobs(
        [
            RawJobSpec("t", {"v": 10}, JobSpec(job_key="k0", run_at=second)),
            RawJobSpec(
                "t",
                {"v": 11},
                JobSpec(job_key="k1", run_at=second, job_key_mode=JobKeyMode.PRESERVE_RUN_AT),
            ),
            RawJobSpec(
                "t",
                {"v": 12},
                JobSpec(job_key="k2", run_at=second, job_key_mode=JobKeyMode.REPLACE),
            ),
        ]
    )
    by_key = {job.key: job for job in updated}
    assert {key: job.run_at for key, job in by_key.items()} == {
        "k0": first,
        "k1": first,
        "k2": first,
    }
    assert {key: job.payload for key, job in by_key.items()} == {
        "k0": {"v": 10},
        "k1": {"v": 11},
        "k2": {"v": 12},
    }
    assert {job.revision for job in updated} == {1}


def test_a_batch_without_preserve_run_at_replaces_run_at(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    first = datetime.now(timezone.utc) + timedelta(hours=1)
    second = first + timedelta(hours=5)
    utils.add_raw_jobs(
        [RawJobSpec("t", {}, JobSpec(job_key=f"k{i}", run_at=first)) for i in range(2)]
    )
    updated = utils.add_raw_jobs(
        [
            RawJobSpec("t", {}, JobSpec(job_key="k0", run_at=second)),
            RawJobSpec("t", {}, JobSpec(job_key="k1", run_at=second, job_key_mode="replace")),
        ]
    )
    assert [job.run_at for job in updated] == [second, second]


# -- ANALYZE after a large batch ------------------------------------------------------


def _analyze_count(engine: Engine, schema: str) -> int:
    return int(
        scalar(
            engine,
            "select analyze_count from pg_stat_user_tables "
            "where schemaname = :s and relname = '_private_jobs'",
            s=schema,
        )
    )


def test_a_batch_of_ten_thousand_jobs_analyzes_the_jobs_table(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    before = _analyze_count(engine, schema)
    with statement_log(engine) as log:
        jobs = utils.add_raw_jobs(RawJobSpec("bulk", {"i": i}) for i in range(ANALYZE_THRESHOLD))
    assert len(jobs) == ANALYZE_THRESHOLD
    analyzed = log.matching("analyze")
    assert len(analyzed) == 1 and "_private_jobs" in analyzed[0]
    assert _analyze_count(engine, schema) == before + 1
    assert scalar(
        engine,
        "select last_analyze is not null from pg_stat_user_tables "
        "where schemaname = :s and relname = '_private_jobs'",
        s=schema,
    )


def test_a_smaller_batch_does_not_analyze(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    before = _analyze_count(engine, schema)
    with statement_log(engine) as log:
        utils.add_raw_jobs(RawJobSpec("bulk", {"i": i}) for i in range(ANALYZE_THRESHOLD - 1))
    assert log.matching("analyze") == []
    assert _analyze_count(engine, schema) == before


# -- typed tasks ----------------------------------------------------------------------


def test_a_dataclass_task_enqueues_with_its_identifier_and_json_payload(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    job = utils.add_job(SendEmail("a@example.com", ["b@example.com"]))
    assert job.task_identifier == "send_email"
    assert job.payload == {"to": "a@example.com", "cc": ["b@example.com"]}
    (row,) = job_rows(engine, schema)
    assert row["task_identifier"] == "send_email"
    assert row["payload"] == {"to": "a@example.com", "cc": ["b@example.com"]}
    assert SendEmail.from_payload(row["payload"]) == SendEmail("a@example.com", ["b@example.com"])


def test_a_pydantic_task_enqueues_with_its_identifier_and_json_payload(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    issued = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    job = utils.add_job(
        Invoice(number=7, amount=12.5, issued=issued), JobSpec(queue_name="billing")
    )
    assert job.task_identifier == "invoice"
    assert job.queue_name == "billing"
    (row,) = job_rows(engine, schema)
    assert row["payload"] == {"number": 7, "amount": 12.5, "issued": "2024-05-06T07:08:09Z"}
    assert Invoice.from_payload(row["payload"]) == Invoice(number=7, amount=12.5, issued=issued)


def test_typed_add_jobs_returns_full_jobs(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    jobs = utils.add_jobs(
        [
            (SendEmail("a@x"), JobSpec(priority=1)),
            (SendEmail("b@x"), None),
            (SendEmail("c@x"), JobSpec(priority=5, queue_name="mail")),
        ]
    )
    assert [job.task_identifier for job in jobs] == ["send_email"] * 3
    assert sorted((job.payload["to"], job.priority, job.queue_name) for job in jobs) == [
        ("a@x", 1, None),
        ("b@x", 0, None),
        ("c@x", 5, "mail"),
    ]
    for job in jobs:
        assert_tz_aware(job)


# -- payloads that are not JSON -------------------------------------------------------


class Opaque:
    """An object with no JSON encoding."""


BAD_PAYLOADS = [
    pytest.param({"thing": Opaque()}, id="object"),
    pytest.param({"x": math.nan}, id="nan"),
    pytest.param({"x": math.inf}, id="infinity"),
    pytest.param({"text": "a\x00b"}, id="nul-char"),
    pytest.param(["ok", {"nested": "\x00"}], id="nested-nul"),
]


@pytest.mark.parametrize("payload", BAD_PAYLOADS)
def test_unencodable_payloads_are_refused_before_any_write(
    engine: Engine, schema: str, payload: Any
) -> None:
    utils = WorkerUtils(engine, schema)
    with statement_log(engine) as log:
        with pytest.raises(PayloadNotSerializable):
            utils.add_raw_job("t", payload)
        with pytest.raises(PayloadNotSerializable):
            utils.add_raw_jobs([RawJobSpec("t", {"fine": 1}), RawJobSpec("t", payload)])
    assert log.statements == []
    assert job_rows(engine, schema) == []


def test_typed_tasks_with_unencodable_fields_are_refused(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    with statement_log(engine) as log:
        with pytest.raises(PayloadNotSerializable):
            utils.add_job(Measure(math.nan))
        with pytest.raises(PayloadNotSerializable):
            utils.add_job(Invoice(number=1, amount=math.nan))
        with pytest.raises(PayloadNotSerializable):
            utils.add_jobs([(Measure(1.0), None), (Measure(math.inf), None)])
        with pytest.raises(PayloadNotSerializable):
            utils.add_job(SendEmail("nul\x00@x"))
    assert log.statements == []
    assert job_rows(engine, schema) == []


async def test_async_unencodable_payloads_are_refused(
    async_engine: AsyncEngine, schema: str
) -> None:
    utils = AsyncWorkerUtils(async_engine, schema)
    with pytest.raises(PayloadNotSerializable):
        await utils.add_raw_job("t", {"thing": Opaque()})
    with pytest.raises(PayloadNotSerializable):
        await utils.add_job(Measure(math.nan))


def test_json_values_round_trip_exactly(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    payload = {"unicode": "é✓🙂", "nested": [1, 2.5, None, True, {"k": "v"}], "quote": "\"'\\"}
    job = utils.add_raw_job("t", payload)
    assert job.payload == payload
    (row,) = job_rows(engine, schema)
    assert row["payload"] == payload
    # None means the empty object, as in Node.
    assert utils.add_raw_job("t").payload == {}
    stored = scalar(
        engine, f"select payload::text from {q(schema)}._private_jobs where id = :id", id=job.id
    )
    assert json.loads(stored) == payload


# -- returned Jobs --------------------------------------------------------------------


def test_mixed_batches_return_each_jobs_identifier_and_queue(engine: Engine, schema: str) -> None:
    # A fresh utils each time: its name cache is empty, so names come from the database.
    WorkerUtils(engine, schema).add_raw_jobs(
        [RawJobSpec("alpha", {}, JobSpec(queue_name="qa")), RawJobSpec("beta", {})]
    )
    specs = [
        RawJobSpec(
            "alpha" if i % 2 else "beta",
            {"i": i},
            JobSpec(queue_name=("qa" if i % 3 == 0 else "qb" if i % 3 == 1 else None)),
        )
        for i in range(64)
    ]
    jobs = WorkerUtils(engine, schema).add_raw_jobs(specs)
    assert len(jobs) == 64
    by_payload = {job.payload["i"]: job for job in jobs}
    for i, spec in enumerate(specs):
        job = by_payload[i]
        assert job.task_identifier == spec.identifier
        assert job.queue_name == spec.spec.queue_name
        assert_tz_aware(job)
    rows = {row["id"]: row for row in job_rows(engine, schema)}
    for job in jobs:
        assert rows[job.id]["task_identifier"] == job.task_identifier
        assert rows[job.id]["queue_name"] == job.queue_name


def test_an_unsafe_dedupe_hit_returns_the_existing_jobs_names(engine: Engine, schema: str) -> None:
    existing = WorkerUtils(engine, schema).add_raw_job(
        "original_task", {"v": 1}, JobSpec(job_key="dd", queue_name="q_original")
    )
    hit = WorkerUtils(engine, schema).add_raw_job(
        "other_task",
        {"v": 2},
        JobSpec(job_key="dd", queue_name="q_other", job_key_mode=JobKeyMode.UNSAFE_DEDUPE),
    )
    assert hit.id == existing.id
    assert hit.revision == 1
    assert hit.task_identifier == "original_task"
    assert hit.queue_name == "q_original"
    assert hit.payload == {"v": 1}
    assert_tz_aware(hit)


def test_a_job_carries_every_field(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    run_at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    job = utils.add_raw_job(
        "full",
        {"a": 1},
        JobSpec(
            queue_name="qq",
            run_at=run_at,
            max_attempts=3,
            job_key="key-1",
            priority=-4,
            flags=["f1", "f2"],
        ),
    )
    assert (job.task_identifier, job.queue_name, job.payload) == ("full", "qq", {"a": 1})
    assert job.run_at == run_at
    assert (job.max_attempts, job.priority, job.attempts, job.revision) == (3, -4, 0, 0)
    assert job.key == "key-1"
    assert job.flags == frozenset({"f1", "f2"})
    assert (job.locked_at, job.locked_by, job.last_error) == (None, None, None)
    assert_tz_aware(job)
    row = job_rows(engine, schema)[0]
    assert row["flags"] == {"f1": True, "f2": True}
    assert job.task_id == row["task_id"] and job.job_queue_id == row["job_queue_id"]


def test_defaults_are_nodes(engine: Engine, schema: str) -> None:
    job = WorkerUtils(engine, schema).add_raw_job("plain")
    db_now = scalar(engine, "select now()")
    assert (job.max_attempts, job.priority, job.queue_name, job.key, job.flags) == (
        25,
        0,
        None,
        None,
        None,
    )
    assert job.run_at <= db_now


def test_names_are_right_after_the_identifier_was_gced_and_readded(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_raw_job("recycled")
    utils.complete_jobs([first.id])
    utils.cleanup()
    second = utils.add_raw_job("recycled")
    assert second.task_id != first.task_id
    assert second.task_identifier == "recycled"
    execute(
        engine,
        f"update {q(schema)}._private_tasks set identifier = 'renamed' where id = :i",
        i=second.task_id,
    )
    # Ids are never reused, so the cache entry for the old id cannot mislead a new job.
    fresh = WorkerUtils(engine, schema).complete_jobs([second.id])
    assert fresh[0].task_identifier == "renamed"
    assert scalar(engine, f"select count(*) from {q(schema)}._private_jobs") == 0
