"""Failures: Node's exact backoff, permanent failure, forbidden flags, batch jobs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine
from worker_fixtures import execute, make_due, rows

from sqla_graphile import (
    BatchTaskHandler,
    Hooks,
    JobSpec,
    TaskHandler,
    Worker,
    WorkerContext,
    WorkerUtils,
    task,
)
from sqla_graphile.schema import quote_schema


class Boom(Exception):
    pass


def explode(message: str) -> None:
    raise Boom(message)


@task("flaky")
def flaky(payload: Any, ctx: WorkerContext) -> None:
    explode(f"failure {ctx.job.attempts}")


def db_now(engine: Engine) -> Any:
    return execute(engine, "select now() as now")[0]["now"]


def test_failure_backoff_is_nodes_formula(engine: Engine, schema: str, utils: WorkerUtils) -> None:
    job = utils.add_raw_job("flaky", {}, JobSpec(max_attempts=25))
    table = f"{quote_schema(schema)}._private_jobs"
    worker = Worker(engine, [flaky], schema=schema)
    for attempt in (1, 2, 3):
        before = db_now(engine)
        make_due(engine, schema)
        worker.run_once()
        after = db_now(engine)
        (row,) = rows(engine, schema)
        assert row["attempts"] == attempt
        assert row["locked_by"] is None and row["locked_at"] is None
        assert row["last_error"].startswith(f"Boom: failure {attempt}")
        # run_at = greatest(now(), run_at) + exp(least(attempts, 10)) s, by the DB's clock.
        (check,) = execute(
            engine,
            f"select run_at - exp(least(attempts, 10)) * interval '1 second' as base "
            f"from {table} where id = :id",
            id=job.id,
        )
        assert before <= check["base"] <= after
        assert abs((row["run_at"] - check["base"]).total_seconds() - math.exp(attempt)) < 1e-3
    # Attempts beyond 10 wait e^10 seconds.
    execute(engine, f"update {table} set attempts = 11, run_at = now() where id = :id", id=job.id)
    worker.run_once()
    (row,) = rows(engine, schema)
    assert row["attempts"] == 12
    (check,) = execute(
        engine,
        f"select extract(epoch from run_at - last_run) as wait from {table}, "
        f"(select now() as last_run) n where id = :id",
        id=job.id,
    )
    assert math.exp(10) - 60 < float(check["wait"]) <= math.exp(10)


def test_failure_stores_message_and_trimmed_traceback_not_updated_at(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    utils.add_raw_job("flaky", {})
    (before,) = rows(engine, schema)
    Worker(engine, [flaky], schema=schema).run_once()
    (row,) = rows(engine, schema)
    first, *trace = row["last_error"].splitlines()
    assert first == "Boom: failure 1"
    assert any("explode" in line for line in trace)
    # The worker's own frames are trimmed away.
    assert not any("sqla_graphile" in line for line in trace)
    assert row["updated_at"] == before["updated_at"]


def test_permanent_failure_keeps_the_row_and_fires_the_hook(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    hooks = Hooks()
    events: list[tuple[str, Any]] = []
    hooks.on("job_fail")(lambda e: events.append(("fail", e)))
    hooks.on("job_permanently_fail")(lambda e: events.append(("permanent", e)))
    job = utils.add_raw_job("flaky", {}, JobSpec(max_attempts=2))
    worker = Worker(engine, [flaky], schema=schema, hooks=hooks)
    worker.run_once()
    make_due(engine, schema)
    worker.run_once()
    make_due(engine, schema)
    worker.run_once()  # nothing left to run: the job is out of attempts

    (row,) = rows(engine, schema)
    assert row["id"] == job.id and row["attempts"] == 2 and row["max_attempts"] == 2
    assert row["is_available"] is False and row["locked_by"] is None
    assert row["last_error"].startswith("Boom: failure 2")
    assert [kind for kind, _ in events] == ["fail", "permanent"]
    fail, permanent = events[0][1], events[1][1]
    assert fail.will_retry and not permanent.will_retry
    assert isinstance(permanent.exception, Boom) and permanent.job.attempts == 2


@task("flagged")
def flagged(payload: Any, ctx: WorkerContext) -> None:
    pass


@pytest.mark.parametrize("kind", ["list", "sync function", "async function"])
def test_forbidden_flags_leave_jobs_queued(
    engine: Engine, schema: str, utils: WorkerUtils, kind: str
) -> None:
    utils.add_raw_job("flagged", {"n": "red"}, JobSpec(flags=["red"]))
    utils.add_raw_job("flagged", {"n": "red+blue"}, JobSpec(flags=["blue", "red"]))
    utils.add_raw_job("flagged", {"n": "blue"}, JobSpec(flags=["blue"]))
    utils.add_raw_job("flagged", {"n": "none"})
    forbidden: Any = ["red", "green"]
    if kind == "sync function":

        def forbidden() -> list[str]:
            return ["red", "green"]

    elif kind == "async function":

        async def forbidden() -> list[str]:
            return ["red", "green"]

    Worker(engine, [flagged], schema=schema, forbidden_flags=forbidden).run_once()
    left = rows(engine, schema)
    assert sorted(r["payload"]["n"] for r in left) == ["red", "red+blue"]
    assert all(r["attempts"] == 0 and r["locked_by"] is None for r in left)


@dataclass
class Item(BatchTaskHandler):
    IDENTIFIER: ClassVar[str] = "items"
    n: int

    @classmethod
    def run_batch(cls, items: list[Item], ctx: WorkerContext) -> Any:
        return [ValueError(f"odd {i.n}") if i.n % 2 else None for i in items]


@dataclass
class AsyncItem(BatchTaskHandler):
    IDENTIFIER: ClassVar[str] = "async_items"
    n: int
    answers: ClassVar[Any] = None

    @classmethod
    async def run_batch(cls, items: list[AsyncItem], ctx: WorkerContext) -> Any:
        if isinstance(cls.answers, Exception):
            raise cls.answers
        return cls.answers


def test_batch_partial_failure_retries_only_failed_items(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    job = utils.add_batch_job([Item(1), Item(2), Item(3), Item(4)])
    Worker(engine, [Item], schema=schema).run_once()
    (row,) = rows(engine, schema)
    assert row["id"] == job.id and row["attempts"] == 1 and row["locked_by"] is None
    assert row["payload"] == [{"n": 1}, {"n": 3}]
    assert row["last_error"] == "2 batch item(s) failed: 0: odd 1, 2: odd 3"


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        (None, None),
        ([None, None], None),
        ([None], "batch handler returned 1 results for 2 payload items"),
        ("nope", "run_batch must return None or a list"),
        (RuntimeError("all broken"), "RuntimeError: all broken"),
    ],
)
def test_batch_outcomes(
    engine: Engine, schema: str, utils: WorkerUtils, answers: Any, message: str | None
) -> None:
    AsyncItem.answers = answers
    utils.add_batch_job([AsyncItem(1), AsyncItem(2)])
    Worker(engine, [AsyncItem], schema=schema).run_once()
    left = rows(engine, schema)
    if message is None:
        assert left == []
        return
    (row,) = left
    assert row["last_error"].startswith(message)
    assert row["payload"] == [{"n": 1}, {"n": 2}]  # the original payload is kept


def test_batch_job_with_non_array_payload_fails_clearly(
    engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    utils.add_raw_job("items", {"n": 1})
    Worker(engine, [Item], schema=schema).run_once()
    (row,) = rows(engine, schema)
    assert row["last_error"].startswith("batch job payload must be a JSON array, got an object")
    assert row["payload"] == {"n": 1}


@dataclass
class Strict(TaskHandler):
    IDENTIFIER: ClassVar[str] = "strict"
    a: int

    def run(self, ctx: WorkerContext) -> None:
        pass


def test_undecodable_payload_fails_the_job(engine: Engine, schema: str, utils: WorkerUtils) -> None:
    utils.add_raw_job("strict", {"b": 2})
    Worker(engine, [Strict], schema=schema).run_once()
    (row,) = rows(engine, schema)
    assert row["last_error"].startswith("TypeError:") and "'b'" in row["last_error"]
