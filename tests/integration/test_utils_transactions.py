"""Transaction proofs on the six bind kinds, on psycopg 3, psycopg2 and asyncpg.

Bound to a ``Connection``/``Session`` (sync or async) a job is part of the caller's
transaction; bound to an ``Engine``/``AsyncEngine`` each call commits on its own.
"""

from __future__ import annotations

import json

import pytest
import utils_fixtures as fx
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from utils_fixtures import (
    BIND_KINDS,
    CALLER_KINDS,
    BindFactory,
    Listener,
    business_notes,
    call,
    job_rows,
    kind_driver_params,
)

from sqla_graphile import (
    Continue,
    Hooks,
    InvalidJobKeyMode,
    JobSpec,
    RawJobSpec,
    WorkerUtils,
)
from sqla_graphile.errors import InvalidArgumentType, sqlstate_of

BAD_MODE = JobSpec(job_key="k", job_key_mode="bogus")

# Fixtures shared by the WorkerUtils tests (see utils_fixtures).
module_schema, schema, binds, listener = fx.module_schema, fx.schema, fx.binds, fx.listener


def _counts(payloads: list[str]) -> list[int]:
    return [json.loads(payload)["count"] for payload in payloads]


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(BIND_KINDS))
async def test_rollback_leaves_no_job_and_no_notification(
    binds: BindFactory,
    listener: Listener,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
) -> None:
    tx = await binds.open(kind, driver)
    await call(tx.business("doomed"))
    job = await tx.add("tx_job", {"n": 1})
    assert job.task_identifier == "tx_job"
    jobs = await call(tx.utils.add_raw_jobs([RawJobSpec("tx_job", {"n": 2})] * 2))
    assert len(jobs) == 2
    if tx.joins_caller:
        # Not committed: invisible elsewhere, and no worker was woken.
        assert job_rows(engine, schema) == []
        assert listener.drain() == []
    else:
        assert len(job_rows(engine, schema)) == 3
        assert _counts(listener.drain()) == [1, 2]
    await call(tx.rollback())
    assert business_notes(engine, schema) == []
    if tx.joins_caller:
        assert job_rows(engine, schema) == []
        assert listener.drain() == []
    else:
        assert len(job_rows(engine, schema)) == 3


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(BIND_KINDS))
async def test_commit_keeps_job_and_business_row_and_notifies_at_commit(
    binds: BindFactory,
    listener: Listener,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
) -> None:
    tx = await binds.open(kind, driver)
    await call(tx.business("order 1"))
    job = await tx.add("tx_job", {"order": 1})
    # Joined to the caller: nothing before its commit. On an engine: at once.
    assert _counts(listener.drain()) == ([] if tx.joins_caller else [1])
    await call(tx.commit())
    assert business_notes(engine, schema) == ["order 1"]
    rows = job_rows(engine, schema)
    assert [(row["id"], row["payload"]) for row in rows] == [(job.id, {"order": 1})]
    assert _counts(listener.drain()) == ([1] if tx.joins_caller else [])
    if not tx.joins_caller:
        return
    # The connection or session stays usable for the caller's next transaction.
    second = await tx.add("tx_job", {"order": 2})
    await call(tx.commit())
    assert [row["id"] for row in job_rows(engine, schema)] == [job.id, second.id]


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(CALLER_KINDS))
@pytest.mark.parametrize("via", ["constructor", "using"])
async def test_a_failed_add_in_a_savepoint_leaves_the_transaction_usable(
    binds: BindFactory,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
    via: str,
) -> None:
    if via == "constructor":
        tx = await binds.open(kind, driver, savepoint=True)
        utils = tx.utils
    else:
        tx = await binds.open(kind, driver)
        utils = tx.utils.using(tx.utils.bind, savepoint=True)
    await call(tx.business("before"))
    kept = await call(utils.add_raw_job("kept", {}))
    with pytest.raises(InvalidJobKeyMode):
        await call(utils.add_raw_job("refused", {}, BAD_MODE))
    await call(tx.business("after"))
    await call(tx.commit())
    assert business_notes(engine, schema) == ["before", "after"]
    assert [row["id"] for row in job_rows(engine, schema)] == [kept.id]


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(CALLER_KINDS))
async def test_a_failed_add_without_savepoint_aborts_the_callers_transaction(
    binds: BindFactory,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
) -> None:
    tx = await binds.open(kind, driver)
    await call(tx.business("before"))
    with pytest.raises(InvalidJobKeyMode) as raised:
        await tx.add("refused", {}, BAD_MODE)
    assert sqlstate_of(raised.value.__cause__) == "GWBKM"  # type: ignore[arg-type]
    # The caller learns it: the next statement of the transaction is refused.
    with pytest.raises(DBAPIError) as aborted:
        await call(tx.business("after"))
    assert sqlstate_of(aborted.value) == "25P02"  # in_failed_sql_transaction
    await call(tx.rollback())
    assert business_notes(engine, schema) == []
    assert job_rows(engine, schema) == []


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(CALLER_KINDS))
async def test_errors_raised_before_the_database_leave_the_transaction_usable(
    binds: BindFactory,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
) -> None:
    from sqla_graphile import InvalidArgument, PayloadNotSerializable

    tx = await binds.open(kind, driver)
    await call(tx.business("before"))
    with pytest.raises(PayloadNotSerializable):
        await tx.add("bad", {"x": float("nan")})
    with pytest.raises(InvalidArgument):
        await call(
            tx.utils.add_raw_jobs(
                [RawJobSpec("b", {}, JobSpec(job_key="k", job_key_mode="unsafe_dedupe"))]
            )
        )
    await call(tx.business("after"))
    await call(tx.commit())
    assert business_notes(engine, schema) == ["before", "after"]
    assert job_rows(engine, schema) == []


@pytest.mark.parametrize(("kind", "driver"), kind_driver_params(CALLER_KINDS))
async def test_a_large_batch_joins_the_callers_transaction(
    binds: BindFactory,
    engine: Engine,
    schema: str,
    kind: str,
    driver: str,
) -> None:
    tx = await binds.open(kind, driver)
    jobs = await call(tx.utils.add_raw_jobs(RawJobSpec("many", {"i": i}) for i in range(10_000)))
    assert len(jobs) == 10_000
    await call(tx.rollback())
    assert job_rows(engine, schema) == []


def test_using_binds_a_long_lived_utils_to_a_requests_session(
    binds: BindFactory,
    listener: Listener,
    engine: Engine,
    schema: str,
) -> None:
    hooks = Hooks()
    hooks.before_job_schedule(lambda ctx: Continue({**ctx.payload, "tenant": "acme"}))
    app_utils = WorkerUtils(engine, schema, hooks=hooks)
    business = f'insert into "{schema}".business (note) values (:n)'

    from sqlalchemy import text

    # A request that fails: its job goes with it.
    with Session(engine) as session:
        session.execute(text(business), {"n": "failed request"})
        app_utils.using(session).add_raw_job("req", {"r": 1})
        session.rollback()
    assert job_rows(engine, schema) == []

    # A request that succeeds: job and business row commit together, with the hooks,
    # schema and savepoint setting of the long-lived utils.
    with Session(engine) as session, session.begin():
        session.execute(text(business), {"n": "good request"})
        job = app_utils.using(session).add_raw_job("req", {"r": 2})
        assert listener.drain() == []
    assert job.payload == {"r": 2, "tenant": "acme"}
    assert business_notes(engine, schema) == ["good request"]
    assert [row["payload"] for row in job_rows(engine, schema)] == [{"r": 2, "tenant": "acme"}]
    assert _counts(listener.drain()) == [1]
    # The long-lived utils itself is still bound to the engine.
    assert app_utils.bind is engine


def test_using_copies_the_settings_and_leaves_the_original_alone(
    engine: Engine, schema: str
) -> None:
    utils = WorkerUtils(engine, schema, savepoint=True, known_identifiers=["kept"])
    with Session(engine) as session, session.begin():
        bound = utils.using(session, savepoint=False)
        assert (bound.bind, bound.savepoint, bound.ops) == (session, False, utils.ops)
        assert bound.known_identifiers == {"kept"} and bound.schema == schema
        assert utils.using(session).savepoint is True
        bound.add_raw_job("shared", {})
    assert (utils.bind, utils.savepoint) == (engine, True)
    # What the bound copy learnt serves the original: its next add is the direct insert.
    assert utils.ops.names.task_ids.keys() == {"shared"}
    with pytest.raises(InvalidArgumentType, match="needs one of Engine, Connection, Session"):
        utils.using(object())  # type: ignore[arg-type]


def test_each_call_on_an_engine_is_its_own_transaction(
    binds: BindFactory,
    engine: Engine,
    schema: str,
) -> None:
    utils = WorkerUtils(engine, schema)
    good = utils.add_raw_job("ok", {})
    with pytest.raises(InvalidJobKeyMode):
        utils.add_raw_job("bad", {}, BAD_MODE)
    after = utils.add_raw_job("ok", {})
    assert [row["id"] for row in job_rows(engine, schema)] == [good.id, after.id]
