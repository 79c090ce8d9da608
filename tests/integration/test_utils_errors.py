"""Database errors surface as named exceptions, on every driver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from utils_fixtures import (
    ASYNC_DRIVERS,
    SYNC_DRIVERS,
    call,
    driver_url,
    job_rows,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    GraphileWorkerError,
    JobSpec,
    RawJobSpec,
    SchemaNotMigrated,
    WorkerUtils,
)
from sqla_graphile._urls import async_engine_from_url, engine_from_url
from sqla_graphile.errors import (
    DuplicateJobKeyInBatch,
    InvalidJobKey,
    InvalidJobKeyMode,
    InvalidJobSpec,
    QueueNameTooLong,
    TaskIdentifierTooLong,
)

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema = fx.module_schema, fx.schema


@pytest.fixture(params=[*SYNC_DRIVERS, *ASYNC_DRIVERS])
async def make_utils(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Any]:
    """A factory of utils on one driver's engine: ``make_utils(schema)``."""
    driver = request.param
    url = driver_url(database_url, driver)
    if driver in SYNC_DRIVERS:
        sync_engine = engine_from_url(url)
        yield lambda schema: WorkerUtils(sync_engine, schema)
        sync_engine.dispose()
    else:
        async_engine = async_engine_from_url(url)
        yield lambda schema: AsyncWorkerUtils(async_engine, schema)
        await async_engine.dispose()


SINGLE_ADD_ERRORS = [
    pytest.param("t", JobSpec(job_key="k", job_key_mode="sometimes"), InvalidJobKeyMode, id="mode"),
    pytest.param("t" * 129, JobSpec(), TaskIdentifierTooLong, id="identifier"),
    pytest.param("t", JobSpec(queue_name="q" * 129), QueueNameTooLong, id="queue"),
    pytest.param("t", JobSpec(job_key=""), InvalidJobKey, id="empty-key"),
    pytest.param("t", JobSpec(job_key="k" * 513), InvalidJobKey, id="long-key"),
]


@pytest.mark.parametrize(("identifier", "spec", "error"), SINGLE_ADD_ERRORS)
async def test_single_add_errors_are_named(
    make_utils: Any, engine: Engine, schema: str, identifier: str, spec: JobSpec, error: type
) -> None:
    utils = make_utils(schema)
    with pytest.raises(error) as raised:
        await call(utils.add_raw_job(identifier, {}, spec))
    assert isinstance(raised.value, GraphileWorkerError)
    assert raised.value.__cause__ is not None  # the driver's error is kept
    assert job_rows(engine, schema) == []


BATCH_ERRORS = [
    pytest.param(
        [RawJobSpec("t", {}, JobSpec(job_key="dup")), RawJobSpec("u", {}, JobSpec(job_key="dup"))],
        DuplicateJobKeyInBatch,
        id="duplicate-key",
    ),
    pytest.param([RawJobSpec("t" * 129, {})], TaskIdentifierTooLong, id="identifier"),
    pytest.param(
        [RawJobSpec("t", {}), RawJobSpec("t", {}, JobSpec(queue_name="q" * 129))],
        QueueNameTooLong,
        id="queue",
    ),
    pytest.param([RawJobSpec("t", {}, JobSpec(job_key=""))], InvalidJobKey, id="key"),
]


@pytest.mark.parametrize(("jobs", "error"), BATCH_ERRORS)
async def test_batch_errors_are_named_and_write_nothing(
    make_utils: Any, engine: Engine, schema: str, jobs: list[RawJobSpec], error: type
) -> None:
    utils = make_utils(schema)
    with pytest.raises(error):
        await call(utils.add_raw_jobs(jobs))
    assert job_rows(engine, schema) == []


async def test_an_unmigrated_schema_is_named(make_utils: Any, schema_name: str) -> None:
    utils = make_utils(schema_name)
    with pytest.raises(SchemaNotMigrated) as raised:
        await call(utils.add_raw_job("t", {}))
    assert raised.value.schema == schema_name
    with pytest.raises(SchemaNotMigrated):
        await call(utils.add_raw_jobs([RawJobSpec("t", {})]))
    with pytest.raises(SchemaNotMigrated):
        await call(utils.complete_jobs([1]))
    with pytest.raises(SchemaNotMigrated):
        await call(utils.cleanup())


def test_a_schema_without_the_worker_objects_is_named(engine: Engine, schema_name: str) -> None:
    from sqlalchemy import text

    with engine.begin() as connection:
        connection.execute(text(f'create schema "{schema_name}"'))
    with pytest.raises(SchemaNotMigrated):
        WorkerUtils(engine, schema_name).add_raw_job("t", {})
    with pytest.raises(SchemaNotMigrated):
        WorkerUtils(engine, schema_name).remove_job("k")


def test_a_bogus_mode_without_a_key_is_ignored_as_in_node(engine: Engine, schema: str) -> None:
    job = WorkerUtils(engine, schema).add_raw_job("t", {}, JobSpec(job_key_mode="sometimes"))
    assert job.key is None
    assert len(job_rows(engine, schema)) == 1


class _IndexLike:
    """An integer in disguise, as NumPy's are."""

    def __index__(self) -> int:
        return 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_name": 5}, "queue_name must be a string, not int"),
        ({"job_key": b"k"}, "job_key must be a string, not bytes"),
        ({"priority": "1"}, "priority must be an integer, not str"),
        ({"max_attempts": 2.5}, "max_attempts must be an integer, not float"),
        ({"flags": "urgent"}, "flags must be a list of strings, not str"),
        ({"flags": ["ok", 7]}, "flags must hold strings, not int"),
    ],
    ids=["queue", "key", "priority", "attempts", "flags-string", "flags-items"],
)
def test_job_spec_names_a_wrong_type_before_anything_is_sent(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidJobSpec, match=message):
        JobSpec(**options)


async def test_job_spec_takes_disguised_integers_and_any_iterable_of_flags(
    make_utils: Any, engine: Engine, schema: str
) -> None:
    spec = JobSpec(priority=_IndexLike(), max_attempts=_IndexLike(), flags=iter(["a", "b"]))
    assert (spec.priority, spec.max_attempts, spec.flags) == (3, 3, ("a", "b"))
    assert hash(spec) == hash(JobSpec(priority=3, max_attempts=3, flags=["a", "b"]))
    job = await call(make_utils(schema).add_raw_job("t", {}, spec))
    assert (job.priority, job.max_attempts, job.flags) == (3, 3, frozenset({"a", "b"}))
    (row,) = job_rows(engine, schema)
    assert row["flags"] == {"a": True, "b": True}
