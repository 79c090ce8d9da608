"""``add_batch_job`` and the ``before_job_schedule`` hooks."""

from __future__ import annotations

from typing import Any

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from utils_fixtures import (
    SendEmail,
    Thumb,
    job_rows,
    q,
    scalar,
    statement_log,
)

from sqla_graphile import (
    AsyncWorkerUtils,
    BeforeJobScheduleContext,
    Continue,
    Fail,
    Hooks,
    InvalidArgument,
    InvalidArgumentType,
    InvalidHookResult,
    JobKeyMode,
    JobScheduleFailed,
    JobScheduleSkipped,
    JobSpec,
    RawJobSpec,
    Skip,
    WorkerUtils,
)

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema = fx.module_schema, fx.schema


def _hooks(*decisions: Any) -> tuple[Hooks, list[BeforeJobScheduleContext]]:
    """Hooks returning ``decisions`` in order (callables get the context), and a call log."""
    hooks = Hooks()
    seen: list[BeforeJobScheduleContext] = []

    def register(decision: Any) -> None:
        def hook(ctx: BeforeJobScheduleContext) -> Any:
            seen.append(ctx)
            return decision(ctx) if callable(decision) else decision

        hooks.before_job_schedule(hook)

    for decision in decisions:
        register(decision)
    return hooks, seen


# -- add_batch_job --------------------------------------------------------------------


def test_a_batch_job_is_one_row_holding_a_json_array(engine: Engine, schema: str) -> None:
    job = WorkerUtils(engine, schema).add_batch_job([Thumb("a.png"), Thumb("b.png")])
    assert job.task_identifier == "thumb"
    assert job.payload == [{"path": "a.png"}, {"path": "b.png"}]
    (row,) = job_rows(engine, schema)
    assert row["payload"] == [{"path": "a.png"}, {"path": "b.png"}]
    assert row["task_identifier"] == "thumb"


def test_keyed_batch_jobs_accumulate_items(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    spec = JobSpec(job_key="thumbs")
    first = utils.add_batch_job([Thumb("a")], spec)
    second = utils.add_batch_job([Thumb("b"), Thumb("c")], spec)
    assert second.id == first.id
    assert second.payload == [{"path": "a"}, {"path": "b"}, {"path": "c"}]


def test_batch_jobs_take_any_key_mode(engine: Engine, schema: str) -> None:
    utils = WorkerUtils(engine, schema)
    first = utils.add_batch_job([Thumb("a")], JobSpec(job_key="u"))
    hit = utils.add_batch_job(
        [Thumb("b")], JobSpec(job_key="u", job_key_mode=JobKeyMode.UNSAFE_DEDUPE)
    )
    assert (hit.id, hit.revision, hit.payload) == (first.id, 1, [{"path": "a"}])


def test_an_empty_batch_job_is_refused_before_hooks_and_writes(engine: Engine, schema: str) -> None:
    hooks, seen = _hooks(None)
    utils = WorkerUtils(engine, schema, hooks=hooks)
    with statement_log(engine) as log, pytest.raises(InvalidArgument, match="at least one item"):
        utils.add_batch_job([])
    assert seen == []
    assert log.statements == []


def test_batch_items_of_two_classes_are_refused(engine: Engine, schema: str) -> None:
    with pytest.raises(InvalidArgumentType, match="BatchTaskHandler"):
        WorkerUtils(engine, schema).add_batch_job([Thumb("a"), SendEmail("x")])
    assert job_rows(engine, schema) == []


@pytest.mark.parametrize(
    ("rewrite", "message"),
    [
        pytest.param({"not": "a list"}, "JSON array", id="object"),
        pytest.param("text", "JSON array", id="string"),
        pytest.param([], "at least one item", id="empty-array"),
    ],
)
def test_a_hook_must_keep_a_batch_a_non_empty_array(
    engine: Engine, schema: str, rewrite: Any, message: str
) -> None:
    hooks, seen = _hooks(Continue(rewrite))
    utils = WorkerUtils(engine, schema, hooks=hooks)
    with statement_log(engine) as log, pytest.raises(InvalidHookResult, match=message):
        utils.add_batch_job([Thumb("a")])
    assert len(seen) == 1
    assert seen[0].payload == [{"path": "a"}]
    assert log.statements == []
    assert job_rows(engine, schema) == []


def test_a_hook_may_rewrite_a_batch_into_another_array(engine: Engine, schema: str) -> None:
    hooks, _seen = _hooks(lambda ctx: Continue([*ctx.payload, {"path": "extra"}]))
    job = WorkerUtils(engine, schema, hooks=hooks).add_batch_job([Thumb("a")])
    assert job_rows(engine, schema)[0]["payload"] == [{"path": "a"}, {"path": "extra"}]
    assert job.payload == [{"path": "a"}, {"path": "extra"}]


# -- before_job_schedule --------------------------------------------------------------


def test_hooks_chain_in_registration_order(engine: Engine, schema: str) -> None:
    hooks, seen = _hooks(
        lambda ctx: Continue({**ctx.payload, "trail": ["first"]}),
        None,  # None continues with the payload unchanged
        lambda ctx: Continue({**ctx.payload, "trail": [*ctx.payload["trail"], "third"]}),
    )
    job = WorkerUtils(engine, schema, hooks=hooks).add_raw_job("chained", {"v": 1})
    assert [ctx.payload for ctx in seen] == [
        {"v": 1},
        {"v": 1, "trail": ["first"]},
        {"v": 1, "trail": ["first"]},
    ]
    assert job.payload == {"v": 1, "trail": ["first", "third"]}
    assert job_rows(engine, schema)[0]["payload"] == {"v": 1, "trail": ["first", "third"]}


def test_a_hook_sees_identifier_and_spec(engine: Engine, schema: str) -> None:
    hooks, seen = _hooks(None)
    spec = JobSpec(queue_name="mail", priority=3)
    WorkerUtils(engine, schema, hooks=hooks).add_job(SendEmail("a@x"), spec)
    (ctx,) = seen
    assert ctx.identifier == "send_email"
    assert ctx.payload == {"to": "a@x", "cc": []}
    assert (ctx.spec.queue_name, ctx.spec.priority) == ("mail", 3)


@pytest.mark.parametrize(
    ("decision", "error"),
    [(Skip(), JobScheduleSkipped), (Fail("not today"), JobScheduleFailed)],
    ids=["skip", "fail"],
)
def test_skip_and_fail_stop_the_chain_and_write_nothing(
    engine: Engine, schema: str, decision: Any, error: type[Exception]
) -> None:
    hooks, seen = _hooks(lambda ctx: Continue({"changed": True}), decision, Continue({"late": 1}))
    utils = WorkerUtils(engine, schema, hooks=hooks)
    with statement_log(engine) as log:
        with pytest.raises(error) as raised:
            utils.add_raw_job("hooked", {"v": 1})
        assert len(seen) == 2  # the third hook never ran
        with pytest.raises(error):
            utils.add_job(SendEmail("a@x"))
        with pytest.raises(error):
            utils.add_batch_job([Thumb("a")])
        with pytest.raises(error):
            utils.add_raw_jobs([RawJobSpec("a", {}), RawJobSpec("b", {})])
    if isinstance(decision, Fail):
        assert "not today" in str(raised.value)
    assert log.statements == []
    assert job_rows(engine, schema) == []
    assert scalar(engine, f"select count(*) from {q(schema)}._private_tasks") == 0


def test_a_batch_is_refused_whole_when_one_job_is_skipped(engine: Engine, schema: str) -> None:
    hooks, seen = _hooks(lambda ctx: Skip() if ctx.payload.get("bad") else None)
    utils = WorkerUtils(engine, schema, hooks=hooks)
    with pytest.raises(JobScheduleSkipped):
        utils.add_raw_jobs(
            [RawJobSpec("a", {"n": 1}), RawJobSpec("a", {"bad": True}), RawJobSpec("a", {"n": 3})]
        )
    assert [ctx.payload for ctx in seen] == [{"n": 1}, {"bad": True}]
    assert job_rows(engine, schema) == []


def test_hooks_transform_each_job_of_a_batch(engine: Engine, schema: str) -> None:
    hooks, _seen = _hooks(lambda ctx: Continue({**ctx.payload, "by": ctx.identifier}))
    jobs = WorkerUtils(engine, schema, hooks=hooks).add_raw_jobs(
        [RawJobSpec("a", {"n": 1}), RawJobSpec("b", {"n": 2})]
    )
    assert sorted((job.payload["n"], job.payload["by"]) for job in jobs) == [(1, "a"), (2, "b")]
    assert sorted(row["payload"]["by"] for row in job_rows(engine, schema)) == ["a", "b"]


def test_a_hook_result_that_is_not_json_is_refused(engine: Engine, schema: str) -> None:
    from sqla_graphile import PayloadNotSerializable

    hooks, _seen = _hooks(Continue({"x": float("nan")}))
    with pytest.raises(PayloadNotSerializable):
        WorkerUtils(engine, schema, hooks=hooks).add_raw_job("a", {})
    assert job_rows(engine, schema) == []


async def test_async_utils_run_the_same_hooks(
    async_engine: AsyncEngine, schema: str, engine: Engine
) -> None:
    hooks, _seen = _hooks(lambda ctx: Continue({**ctx.payload, "async": True}))
    utils = AsyncWorkerUtils(async_engine, schema, hooks=hooks)
    job = await utils.add_raw_job("a", {"v": 1})
    assert job.payload == {"v": 1, "async": True}
    with pytest.raises(JobScheduleFailed):
        await AsyncWorkerUtils(async_engine, schema, hooks=_hooks(Fail("no"))[0]).add_batch_job(
            [Thumb("a")]
        )
    assert len(job_rows(engine, schema)) == 1
