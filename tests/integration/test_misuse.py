"""Misuse and bad values get a named error before anything is sent, and nothing is written.

A wrong kind of argument (an identifier for a task, a dict for a ``JobSpec``, an id for a
key) raises :class:`InvalidArgumentType` naming the call that was meant; a value out of
its column's range raises :class:`ValueOutOfRange` before any statement; a refused add
leaves nothing behind even when the caller commits. Rescheduling by a ``timedelta``
counts from the database's clock.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from utils_fixtures import (
    BIND_KINDS,
    CALLER_KINDS,
    BindFactory,
    SendEmail,
    Thumb,
    call,
    execute,
    job_rows,
    kind_driver_params,
    q,
    statement_log,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    EventLoopAlreadyRunning,
    GraphileWorkerError,
    InvalidArgumentType,
    InvalidCharacter,
    InvalidJobSpec,
    InvalidMaxAttempts,
    JobKeyLocked,
    JobSpec,
    PayloadNotSerializable,
    RawJobSpec,
    RescheduleJobOptions,
    UsageError,
    ValueOutOfRange,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile._ops import KEY_RACE_RETRIES

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema, binds = fx.module_schema, fx.schema, fx.binds

PLUS_5 = timezone(timedelta(hours=5))
MINUS_5 = timezone(timedelta(hours=-5))


# -- the wrong kind of argument -------------------------------------------------------------


@pytest.fixture(params=["sync", "async"])
async def utils(
    request: pytest.FixtureRequest, engine: Engine, async_engine: AsyncEngine, schema: str
) -> tuple[Any, Engine]:
    """Utils of either twin on the test schema, and the sync engine its statements pass."""
    if request.param == "sync":
        return WorkerUtils(engine, schema), engine
    return AsyncWorkerUtils(async_engine, schema), async_engine.sync_engine


MISUSE: list[Any] = [
    pytest.param(
        lambda u: u.add_job("send_email", {"to": "a@example.com"}),
        "add_raw_job('send_email', payload)",
        id="add_job-identifier",
    ),
    pytest.param(
        lambda u: u.add_job(SendEmail("a@example.com"), {"queue_name": "mail"}),
        "JobSpec(queue_name=...)",
        id="add_job-dict-spec",
    ),
    pytest.param(
        lambda u: u.add_raw_job("send_email", {}, {"run_at": None}),
        "JobSpec(run_at=...)",
        id="add_raw_job-dict-spec",
    ),
    pytest.param(
        lambda u: u.add_raw_job(SendEmail("a@example.com")),
        "add_job(task)",
        id="add_raw_job-task",
    ),
    pytest.param(lambda u: u.add_job(SendEmail), "add_job(SendEmail(...))", id="add_job-class"),
    pytest.param(lambda u: u.add_job(Thumb("p")), "add_batch_job", id="add_job-batch-item"),
    pytest.param(
        lambda u: u.add_jobs([(SendEmail("a@example.com"), {"priority": 1})]),
        "JobSpec(priority=...)",
        id="add_jobs-dict-spec",
    ),
    pytest.param(
        lambda u: u.add_jobs([SendEmail("a@example.com")]), "(task, spec)", id="add_jobs-bare"
    ),
    pytest.param(
        lambda u: u.add_raw_jobs([("send_email", {})]), "RawJobSpec(", id="add_raw_jobs-tuple"
    ),
    pytest.param(
        lambda u: u.add_batch_job([SendEmail("a@example.com")]), "add_job", id="batch-task"
    ),
    pytest.param(lambda u: u.remove_job(38), "complete_jobs([38])", id="remove_job-id"),
    pytest.param(lambda u: u.complete_jobs(38), "list of job ids", id="complete_jobs-int"),
    pytest.param(lambda u: u.complete_jobs(["38"]), "integers", id="complete_jobs-strings"),
    pytest.param(
        lambda u: u.force_unlock_workers("worker-1"), "list of worker ids", id="force_unlock-str"
    ),
    pytest.param(lambda u: u.cleanup("GC_JOB_QUEUES"), "list of CleanupTask", id="cleanup-str"),
    pytest.param(
        lambda u: u.reschedule_jobs([1], {"priority": 1}),
        "RescheduleJobOptions(",
        id="reschedule-dict",
    ),
]


@pytest.mark.parametrize(("misuse", "hint"), MISUSE)
async def test_misuse_is_named_and_points_at_the_right_call(
    utils: tuple[Any, Engine], engine: Engine, schema: str, misuse: Callable[[Any], Any], hint: str
) -> None:
    twin, sent_through = utils
    with statement_log(sent_through) as log, pytest.raises(InvalidArgumentType) as raised:
        await call(misuse(twin))
    assert hint in str(raised.value)
    # One hierarchy, and the built-in a Python caller would catch.
    assert isinstance(raised.value, UsageError)
    assert isinstance(raised.value, GraphileWorkerError)
    assert isinstance(raised.value, TypeError)
    assert log.statements == []
    assert job_rows(engine, schema) == []


def test_remove_job_by_key_still_returns_none_for_an_unknown_key(
    engine: Engine, schema: str
) -> None:
    assert WorkerUtils(engine, schema).remove_job("no such key") is None


# -- a blocking run inside a running event loop ----------------------------------------------


@task("noop")
def _noop(payload: Any, ctx: WorkerContext) -> None:
    return None


@pytest.mark.parametrize(("method", "twin"), [("run_once", "run_once_async"), ("run", "run_async")])
async def test_a_blocking_run_inside_an_event_loop_is_named_without_a_stray_coroutine(
    database_url: str, schema: str, method: str, twin: str
) -> None:
    worker = Worker(database_url, [_noop], schema=schema)
    asyncio.get_running_loop()  # the test itself runs in one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(EventLoopAlreadyRunning) as raised:
            getattr(worker, method)()
        gc.collect()  # a coroutine made and dropped would warn here
    assert f"await worker.{twin}()" in str(raised.value)
    assert isinstance(raised.value, RuntimeError)
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert not worker.running


# -- values out of range: refused before anything is sent --------------------------------------


OUT_OF_RANGE: list[Any] = [
    pytest.param(
        lambda: JobSpec(run_at=datetime(1, 1, 1, tzinfo=PLUS_5)),
        ValueOutOfRange,
        id="run_at-year-1",
    ),
    pytest.param(
        lambda: JobSpec(run_at=datetime(9999, 12, 31, 23, tzinfo=MINUS_5)),
        ValueOutOfRange,
        id="run_at-year-10000",
    ),
    pytest.param(lambda: JobSpec(run_at=datetime(1, 1, 1)), InvalidJobSpec, id="run_at-naive"),
    pytest.param(lambda: JobSpec(run_at="2030-01-01"), InvalidJobSpec, id="run_at-text"),
    pytest.param(lambda: JobSpec(priority=40_000), ValueOutOfRange, id="priority-high"),
    pytest.param(lambda: JobSpec(priority=-40_000), ValueOutOfRange, id="priority-low"),
    pytest.param(lambda: JobSpec(max_attempts=70_000), ValueOutOfRange, id="max_attempts-high"),
    pytest.param(lambda: JobSpec(max_attempts=2**31), ValueOutOfRange, id="max_attempts-int4"),
    pytest.param(lambda: JobSpec(max_attempts=0), InvalidMaxAttempts, id="max_attempts-zero"),
    pytest.param(
        lambda: RescheduleJobOptions(run_at=datetime(1, 1, 1, tzinfo=PLUS_5)),
        ValueOutOfRange,
        id="reschedule-run_at",
    ),
    pytest.param(
        lambda: RescheduleJobOptions(run_at=datetime(2030, 1, 1)),
        InvalidJobSpec,
        id="reschedule-naive",
    ),
    pytest.param(
        lambda: RescheduleJobOptions(priority=32_768), ValueOutOfRange, id="reschedule-priority"
    ),
    pytest.param(
        lambda: RescheduleJobOptions(attempts=-32_769), ValueOutOfRange, id="reschedule-attempts"
    ),
    pytest.param(
        lambda: RescheduleJobOptions(max_attempts=0), InvalidMaxAttempts, id="reschedule-max"
    ),
]


def test_a_naive_run_at_is_an_invalid_job_spec() -> None:
    with pytest.raises(InvalidJobSpec, match="timezone-aware"):
        JobSpec(run_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError):  # still a ValueError, as before
        JobSpec(run_at=datetime(2030, 1, 1))
    aware = datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert JobSpec(run_at=aware).run_at == aware


@pytest.mark.parametrize(("make", "error"), OUT_OF_RANGE)
def test_values_out_of_range_are_refused_by_name(make: Callable[[], Any], error: type) -> None:
    with pytest.raises(error) as raised:
        make()
    assert isinstance(raised.value, InvalidJobSpec)  # and so a ValueError
    assert raised.value.__cause__ is None  # no database was asked


def test_the_edges_of_the_range_are_accepted(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    earliest = datetime(1, 1, 2, tzinfo=timezone.utc)
    latest = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)
    low = utils.add_raw_job("t", {}, JobSpec(run_at=earliest, priority=-32768, max_attempts=1))
    high = utils.add_raw_job("t", {}, JobSpec(run_at=latest, priority=32767, max_attempts=32767))
    assert (low.run_at, low.priority, low.max_attempts) == (earliest, -32768, 1)
    assert (high.run_at, high.priority, high.max_attempts) == (latest, 32767, 32767)


#: Adds refused before anything is sent: (identifier, payload, spec factory, error).
REFUSED_ADDS = [
    pytest.param(
        "t",
        {},
        lambda: JobSpec(run_at=datetime(1, 1, 1, tzinfo=PLUS_5)),
        ValueOutOfRange,
        id="run_at",
    ),
    pytest.param("t\0", {}, JobSpec, InvalidCharacter, id="identifier-nul"),
    pytest.param("t\ud800", {}, JobSpec, InvalidCharacter, id="identifier-surrogate"),
    pytest.param("t", {"a": "x\ud800"}, JobSpec, PayloadNotSerializable, id="payload-surrogate"),
    pytest.param("t", {}, lambda: JobSpec(job_key="k\0"), InvalidCharacter, id="key-nul"),
    pytest.param(
        "t", {}, lambda: JobSpec(queue_name="q\udfff"), InvalidCharacter, id="queue-surrogate"
    ),
    pytest.param("t", {}, lambda: JobSpec(flags=["f\0"]), InvalidCharacter, id="flag-nul"),
]


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(CALLER_KINDS))
@pytest.mark.parametrize("batch", [False, True], ids=["add_raw_job", "add_raw_jobs"])
@pytest.mark.parametrize(("identifier", "payload", "make_spec", "error"), REFUSED_ADDS)
async def test_a_refused_add_leaves_nothing_even_when_the_caller_commits(
    binds: BindFactory,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
    batch: bool,
    identifier: str,
    payload: Any,
    make_spec: Callable[[], JobSpec],
    error: type[Exception],
) -> None:
    tx = await binds.open(kind, driver)
    await call(tx.business("before"))
    with pytest.raises(error):
        spec = make_spec()
        if batch:
            jobs = [RawJobSpec("t", {}), RawJobSpec(identifier, payload, spec)]
            await call(tx.utils.add_raw_jobs(jobs))
        else:
            await tx.add(identifier, payload, spec)
    await call(tx.business("after"))  # the transaction is still usable
    await call(tx.commit())
    assert job_rows(engine, schema) == []


# -- reschedule by a timedelta: from the database's clock ---------------------------------------


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(BIND_KINDS))
async def test_reschedule_by_a_timedelta_counts_from_the_database_clock(
    binds: BindFactory, schema: str, kind: str, driver: str
) -> None:
    tx = await binds.open(kind, driver)
    job = await tx.add("t", {}, JobSpec(run_at=datetime(2999, 1, 1, tzinfo=timezone.utc)))
    delta = timedelta(hours=1, microseconds=7)
    (later,) = await call(tx.utils.reschedule_jobs([job.id], RescheduleJobOptions(run_at=delta)))
    # reschedule_jobs stamps updated_at with now() of the very transaction.
    assert later.run_at == later.updated_at + delta
    if tx.joins_caller:
        # One transaction, one now(): the add's created_at is the same instant.
        assert later.run_at == job.created_at + delta
    (now,) = await call(tx.utils.reschedule_jobs([job.id], RescheduleJobOptions()))
    assert now.run_at == now.updated_at


async def test_reschedule_past_the_end_of_time_is_refused_without_a_write(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema)
    job = utils.add_raw_job("t", {})
    with pytest.raises(ValueOutOfRange, match="out of range"):
        utils.reschedule_jobs([job.id], RescheduleJobOptions(run_at=timedelta(days=3_000_000)))
    with pytest.raises(ValueOutOfRange, match="out of range"):
        utils.reschedule_jobs([job.id], RescheduleJobOptions(run_at=timedelta(days=-800_000)))
    (row,) = job_rows(engine, schema)
    assert (row["run_at"], row["updated_at"]) == (job.run_at, job.updated_at)


def test_reschedule_options_docstring_says_what_none_does() -> None:
    doc = RescheduleJobOptions.__doc__ or ""
    assert "left ``None`` the\n    jobs become runnable now" in doc
    assert "None`` leaves one alone" not in doc


# -- a keyed add that loses every race --------------------------------------------------------


@pytest.fixture
def detaching_refused(engine: Engine, schema: str) -> Iterator[str]:
    """A trigger that keeps a locked keyed job from giving up its key, as if a worker
    locked it between ``add_jobs``' detach and its upsert, on every try (Node #580)."""
    execute(
        engine,
        f"""
        create function {q(schema)}.keep_key() returns trigger language plpgsql as $$
        begin
          if new.key is null and old.key is not null then return null; end if;
          return new;
        end $$
        """,
    )
    execute(
        engine,
        f"create trigger keep_key before update on {q(schema)}._private_jobs"
        f" for each row execute function {q(schema)}.keep_key()",
    )
    yield schema
    execute(engine, f"drop function {q(schema)}.keep_key() cascade")


@pytest.mark.parametrize("batch", [False, True], ids=["add_raw_job", "add_raw_jobs"])
def test_a_keyed_add_that_loses_every_race_raises_job_key_locked(
    engine: Engine, detaching_refused: str, batch: bool
) -> None:
    schema = detaching_refused
    utils = WorkerUtils(engine, schema)
    held = utils.add_raw_job("t", {"v": 1}, JobSpec(job_key="k"))
    execute(
        engine,
        f"update {q(schema)}._private_jobs set locked_at = now(), locked_by = 'w' where id = :id",
        id=held.id,
    )
    with statement_log(engine) as log, pytest.raises(JobKeyLocked) as raised:
        if batch:
            utils.add_raw_jobs([RawJobSpec("t", {"v": 2}, JobSpec(job_key="k"))])
        else:
            utils.add_raw_job("t", {"v": 2}, JobSpec(job_key="k"))
    assert raised.value.keys == ["k"]
    assert f"each of {KEY_RACE_RETRIES} attempts" in str(raised.value)
    assert len(log.statements) == KEY_RACE_RETRIES
    assert [(row["id"], row["payload"]) for row in job_rows(engine, schema)] == [
        (held.id, {"v": 1})
    ]
