"""Per-task job defaults: a field the ``JobSpec`` sets, else the task's default, else the
database's. Asserted on the stored rows, for both faces and for batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
import utils_fixtures as fx
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from utils_fixtures import SendEmail, call, job_row, job_rows

from sqla_graphile import (
    AsyncWorkerUtils,
    BatchTaskHandler,
    InvalidJobKeyMode,
    JobKeyMode,
    JobSpec,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile.errors import InvalidJobSpec

module_schema, schema = fx.module_schema, fx.schema


@dataclass
class Report(TaskHandler):
    IDENTIFIER: ClassVar[str] = "report"
    QUEUE_NAME: ClassVar[str | None] = "reports"
    MAX_ATTEMPTS: ClassVar[int | None] = 3
    PRIORITY: ClassVar[int | None] = 7

    number: int

    def run(self, ctx: WorkerContext) -> None: ...


@dataclass
class Nightly(TaskHandler):
    IDENTIFIER: ClassVar[str] = "nightly"
    JOB_KEY: ClassVar[str | None] = "nightly"
    JOB_KEY_MODE: ClassVar[JobKeyMode | str | None] = "preserve_run_at"

    day: int

    def run(self, ctx: WorkerContext) -> None: ...


class Invoice(BaseModel, TaskHandler):
    IDENTIFIER: ClassVar[str] = "typed_invoice"
    PRIORITY: ClassVar[int | None] = -5

    number: int


@dataclass
class Thumb(BatchTaskHandler):
    IDENTIFIER: ClassVar[str] = "thumb_defaults"
    QUEUE_NAME: ClassVar[str | None] = "thumbs"
    MAX_ATTEMPTS: ClassVar[int | None] = 2

    path: str


@pytest.fixture(params=["sync", "async"])
async def utils(
    request: pytest.FixtureRequest, engine: Engine, async_engine: AsyncEngine, schema: str
) -> AsyncIterator[WorkerUtils | AsyncWorkerUtils]:
    """Either face on the test's schema (calls are awaited with ``call``)."""
    yield (
        WorkerUtils(engine, schema)
        if request.param == "sync"
        else AsyncWorkerUtils(async_engine, schema)
    )


def options(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["queue_name"], row["max_attempts"], row["priority"], row["key"]


async def test_task_defaults_fill_only_what_the_spec_leaves_unset(
    engine: Engine, schema: str, utils: Any
) -> None:
    bare = await call(utils.add_job(Report(number=1)))
    mixed = await call(utils.add_job(Report(number=2), JobSpec(priority=1, queue_name="other")))
    plain = await call(utils.add_job(SendEmail(to="a@example.com")))  # a task without defaults
    assert options(job_row(engine, schema, bare.id) or {}) == ("reports", 3, 7, None)
    assert options(job_row(engine, schema, mixed.id) or {}) == ("other", 3, 1, None)
    assert options(job_row(engine, schema, plain.id) or {}) == (None, 25, 0, None)
    assert (bare.queue_name, bare.max_attempts, bare.priority) == ("reports", 3, 7)


async def test_pydantic_task_defaults(engine: Engine, schema: str, utils: Any) -> None:
    job = await call(utils.add_job(Invoice(number=1)))
    assert (job_row(engine, schema, job.id) or {})["priority"] == -5


async def test_a_default_key_and_key_mode(engine: Engine, schema: str, utils: Any) -> None:
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    later = soon + timedelta(hours=1)
    first = await call(utils.add_job(Nightly(day=1), JobSpec(run_at=soon)))
    # The default mode (preserve_run_at) keeps the waiting job's time; the payload changes.
    again = await call(utils.add_job(Nightly(day=2), JobSpec(run_at=later)))
    (row,) = job_rows(engine, schema)
    assert again.id == first.id and row["key"] == "nightly"
    assert row["run_at"] == soon and row["payload"] == {"day": 2}
    # A mode in the spec wins over the task's: replace moves the time.
    await call(utils.add_job(Nightly(day=3), JobSpec(run_at=later, job_key_mode="replace")))
    (row,) = job_rows(engine, schema)
    assert row["run_at"] == later and row["payload"] == {"day": 3}


async def test_add_jobs_applies_each_jobs_task_defaults(
    engine: Engine, schema: str, utils: Any
) -> None:
    shared = JobSpec(priority=-1)
    jobs = await call(
        utils.add_jobs(
            [
                (Report(number=1), None),
                (Report(number=2), shared),
                (Report(number=3), shared),
                (SendEmail(to="b@example.com"), shared),
                (Report(number=4), JobSpec(queue_name="other", max_attempts=9)),
            ]
        )
    )
    stored = [options(job_row(engine, schema, job.id) or {}) for job in jobs]
    assert stored == [
        ("reports", 3, 7, None),
        ("reports", 3, -1, None),
        ("reports", 3, -1, None),
        (None, 25, -1, None),
        ("other", 9, 7, None),
    ]


async def test_add_batch_job_applies_the_batch_tasks_defaults(
    engine: Engine, schema: str, utils: Any
) -> None:
    job = await call(utils.add_batch_job([Thumb(path="a"), Thumb(path="b")]))
    row = job_row(engine, schema, job.id) or {}
    assert (row["queue_name"], row["max_attempts"], row["payload"]) == (
        "thumbs",
        2,
        [{"path": "a"}, {"path": "b"}],
    )


async def test_add_raw_job_applies_no_task_defaults(
    engine: Engine, schema: str, utils: Any
) -> None:
    job = await call(utils.add_raw_job("report", {"number": 1}))
    assert options(job_row(engine, schema, job.id) or {}) == (None, 25, 0, None)


@task("sms", queue_name="sms", priority=3, max_attempts=4)
def sms(payload: Any, ctx: WorkerContext) -> None: ...


async def test_function_task_defaults_through_job_spec(
    engine: Engine, schema: str, utils: Any
) -> None:
    assert sms.defaults == JobSpec(queue_name="sms", priority=3, max_attempts=4)
    bare = await call(utils.add_raw_job("sms", {}, sms.job_spec()))
    mixed = await call(utils.add_raw_job("sms", {}, sms.job_spec(JobSpec(priority=0))))
    assert options(job_row(engine, schema, bare.id) or {}) == ("sms", 4, 3, None)
    assert options(job_row(engine, schema, mixed.id) or {}) == ("sms", 4, 0, None)


def test_bad_defaults_are_refused_where_the_task_is_defined() -> None:
    with pytest.raises(InvalidJobSpec, match=r"task 'x'.*queue_name must be a string"):
        task("x", queue_name=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobKeyMode, match="task 'x' must be one of"):
        task("x", job_key_mode="sometimes")
    assert task("x", job_key_mode="replace")(sms).defaults.job_key_mode is JobKeyMode.REPLACE


async def test_bad_class_defaults_are_refused_and_nothing_is_written(
    engine: Engine, schema: str, utils: Any
) -> None:
    @dataclass
    class Broken(TaskHandler):
        IDENTIFIER: ClassVar[str] = "broken"
        PRIORITY: ClassVar[Any] = "high"

        def run(self, ctx: WorkerContext) -> None: ...

    with pytest.raises(InvalidJobSpec, match=r"Broken.*priority must be an integer"):
        await call(utils.add_job(Broken()))
    with pytest.raises(InvalidJobSpec, match="Broken"):
        await call(utils.add_jobs([(Report(number=1), None), (Broken(), None)]))
    with pytest.raises(InvalidJobSpec, match="Broken"):
        Worker(engine, [Broken], schema=schema)
    assert job_rows(engine, schema) == []
