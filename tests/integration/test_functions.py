"""The typed bindings of ``sqla_graphile.functions`` against a migrated schema."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    String,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from sqla_graphile import NotSchemaOwner, SchemaNotMigrated, worker_schema
from sqla_graphile._urls import engine_from_url
from sqla_graphile.errors import InvalidJobKeyMode, translate_db_error
from sqla_graphile.functions import WorkerFunctions, worker_functions
from sqla_graphile.schema import quote_schema

PRIVATE_JOB_COLUMNS = [
    "id",
    "job_queue_id",
    "task_id",
    "payload",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "last_error",
    "created_at",
    "updated_at",
    "key",
    "locked_at",
    "locked_by",
    "revision",
    "flags",
    "is_available",
]

RUN_AT = datetime(2031, 5, 17, 9, 30, tzinfo=timezone.utc)


def _add(connection: Connection, gw: WorkerFunctions, *args: Any, **kw: Any) -> Any:
    return connection.execute(select(gw.rows_of(gw.add_job(*args, **kw)))).one()


def _view(connection: Connection, schema: str, job_id: int) -> Any:
    jobs = worker_schema(schema).jobs
    return connection.execute(select(jobs).where(jobs.c.id == job_id)).one_or_none()


def _lock(connection: Connection, schema: str, job_id: int, by: str = "pool-dead") -> None:
    ws = worker_schema(schema)
    connection.execute(
        update(ws.private_jobs)
        .where(ws.private_jobs.c.id == job_id)
        .values(locked_at=func.now(), locked_by=by, attempts=ws.private_jobs.c.attempts + 1)
    )


# --- add_job -------------------------------------------------------------------------------


def test_add_job_with_every_option(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        row = _add(
            connection,
            gw,
            "every_option",
            '{"to": "a@example.com"}',
            queue_name="mail",
            run_at=RUN_AT,
            max_attempts=3,
            job_key="welcome:1",
            priority=-5,
            flags=["slow", "external"],
            job_key_mode="replace",
        )
        seen = _view(connection, schema, row.id)
    assert list(row._fields) == PRIVATE_JOB_COLUMNS
    assert row.payload == {"to": "a@example.com"}
    assert row.run_at == RUN_AT
    assert (row.max_attempts, row.priority, row.key) == (3, -5, "welcome:1")
    assert row.flags == {"slow": True, "external": True}
    assert (row.attempts, row.revision, row.is_available) == (0, 0, True)
    assert seen.task_identifier == "every_option"
    assert seen.queue_name == "mail"
    assert seen.run_at == RUN_AT


def test_add_job_defaults(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        row = _add(connection, gw, "plain")
        now = connection.scalar(select(func.now()))
        seen = _view(connection, schema, row.id)
    assert row.payload == {}
    assert row.run_at == now  # the transaction's now()
    assert (row.max_attempts, row.priority, row.key, row.flags) == (25, 0, None, None)
    assert row.job_queue_id is None and seen.queue_name is None


def test_add_job_payload_from_a_sql_expression(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        row = _add(connection, gw, "expr", func.json_build_object("n", 41 + 1, "s", "x"))
    assert row.payload == {"n": 42, "s": "x"}


def test_add_job_payload_must_be_json_text_or_sql(schema: str) -> None:
    gw = worker_functions(schema)
    with pytest.raises(TypeError, match="JSON text or a SQL expression"):
        gw.add_job("x", {"not": "encoded"})


def test_add_job_key_modes(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    later = RUN_AT + timedelta(days=1)
    with engine.begin() as connection:
        first = _add(connection, gw, "keyed", '{"v": 1}', job_key="k", run_at=RUN_AT)
        preserved = _add(
            connection,
            gw,
            "keyed",
            '{"v": 2}',
            job_key="k",
            run_at=later,
            job_key_mode="preserve_run_at",
        )
        replaced = _add(connection, gw, "keyed", '{"v": 3}', job_key="k", run_at=later)
        deduped = _add(
            connection,
            gw,
            "keyed",
            '{"v": 4}',
            job_key="k",
            run_at=RUN_AT,
            job_key_mode="unsafe_dedupe",
        )
    assert first.id == preserved.id == replaced.id == deduped.id
    assert (preserved.run_at, preserved.payload, preserved.revision) == (RUN_AT, {"v": 2}, 1)
    assert (replaced.run_at, replaced.payload, replaced.revision) == (later, {"v": 3}, 2)
    assert (deduped.run_at, deduped.payload, deduped.revision) == (later, {"v": 3}, 3)


def test_add_job_bad_key_mode_translates(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        _add(connection, gw, "x", job_key="k", job_key_mode="bogus")
    assert isinstance(translate_db_error(info.value, schema=schema), InvalidJobKeyMode)


# --- add_jobs ------------------------------------------------------------------------------


def _specs(*specs: dict[str, Any]) -> str:
    return json.dumps(specs, default=lambda value: value.isoformat())


@pytest.mark.parametrize("preserve", [True, False])
def test_add_jobs_from_json_specs(engine: Engine, schema: str, preserve: bool) -> None:
    gw = worker_functions(schema)
    ws = worker_schema(schema)
    later = RUN_AT + timedelta(hours=3)
    first_batch = _specs(
        {
            "identifier": "batch_a",
            "payload": [1],
            "queue_name": "bq",
            "run_at": RUN_AT,
            "max_attempts": 4,
            "job_key": "bk",
            "priority": 2,
            "flags": ["f"],
        },
        {"identifier": "batch_b"},
    )
    second_batch = _specs(
        {"identifier": "batch_a", "payload": [2], "run_at": later, "job_key": "bk"},
    )
    with engine.begin() as connection:
        added = connection.execute(
            select(gw.rows_of(gw.add_jobs(gw.specs_from_json(first_batch)))).order_by(text("id"))
        ).all()
        again = connection.execute(
            select(gw.rows_of(gw.add_jobs(gw.specs_from_json(second_batch), preserve)))
        ).one()
        view = connection.execute(
            select(ws.jobs.c.task_identifier, ws.jobs.c.queue_name).order_by(ws.jobs.c.id)
        ).all()
    a, b = added
    assert (a.payload, a.run_at, a.max_attempts, a.key, a.priority) == ([1], RUN_AT, 4, "bk", 2)
    assert a.flags == {"f": True}
    assert (b.payload, b.max_attempts, b.key, b.priority, b.flags) == ({}, 25, None, 0, None)
    assert again.id == a.id
    assert again.revision == 1
    assert again.payload == [1, 2]  # array payloads of one key are concatenated
    assert again.run_at == (RUN_AT if preserve else later)
    assert view == [("batch_a", None), ("batch_b", None)]  # omitted queue becomes NULL


# --- remove_job, complete_jobs, permanently_fail_jobs, reschedule_jobs -----------------------


def test_remove_job(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        waiting = _add(connection, gw, "r", job_key="waiting")
        running = _add(connection, gw, "r", job_key="running")
        _lock(connection, schema, running.id)
        removed = connection.execute(select(gw.rows_of(gw.remove_job("waiting")))).one()
        stopped = connection.execute(select(gw.rows_of(gw.remove_job("running")))).one()
        missing = connection.execute(select(gw.rows_of(gw.remove_job("nope")))).one()
        assert _view(connection, schema, waiting.id) is None
        still = _view(connection, schema, running.id)
    assert removed.id == waiting.id
    assert stopped.id == running.id and stopped.key is None
    assert stopped.attempts == stopped.max_attempts
    assert missing.id is None  # the function returns an all-NULL row
    assert still.key is None and still.locked_by == "pool-dead"


def test_complete_jobs(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        done = _add(connection, gw, "c")
        locked = _add(connection, gw, "c")
        kept = _add(connection, gw, "c")
        _lock(connection, schema, locked.id)
        completed = connection.execute(
            select(gw.rows_of(gw.complete_jobs([done.id, locked.id])))
        ).all()
        left = connection.scalars(select(worker_schema(schema).jobs.c.id).order_by(text("id")))
        left_ids = list(left)
    assert [r.id for r in completed] == [done.id]  # a locked job is skipped
    assert left_ids == [locked.id, kept.id]


def test_permanently_fail_jobs(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        one = _add(connection, gw, "f", max_attempts=7)
        two = _add(connection, gw, "f")
        with_message = connection.execute(
            select(gw.rows_of(gw.permanently_fail_jobs([one.id], "gave up")))
        ).one()
        default_message = connection.execute(
            select(gw.rows_of(gw.permanently_fail_jobs((two.id,))))
        ).one()
    assert (with_message.last_error, with_message.attempts) == ("gave up", 7)
    assert with_message.is_available is False
    assert default_message.last_error == "Manually marked as failed"
    assert default_message.attempts == 25


def test_reschedule_jobs(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with engine.begin() as connection:
        job = _add(connection, gw, "s", run_at=RUN_AT, priority=1)
        moved = connection.execute(
            select(
                gw.rows_of(
                    gw.reschedule_jobs(
                        [job.id],
                        run_at=RUN_AT + timedelta(minutes=5),
                        priority=9,
                        attempts=2,
                        max_attempts=30,
                    )
                )
            )
        ).one()
        untouched = connection.execute(select(gw.rows_of(gw.reschedule_jobs([job.id])))).one()
    assert moved.run_at == RUN_AT + timedelta(minutes=5)
    assert (moved.priority, moved.attempts, moved.max_attempts) == (9, 2, 30)
    # With no argument, the SQL function keeps every column (Node's semantics).
    assert (untouched.run_at, untouched.priority, untouched.attempts) == (moved.run_at, 9, 2)


def test_force_unlock_workers(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    ws = worker_schema(schema)
    with engine.begin() as connection:
        dead = _add(connection, gw, "u", queue_name="uq")
        alive = _add(connection, gw, "u")
        _lock(connection, schema, dead.id, by="pool-dead")
        _lock(connection, schema, alive.id, by="pool-alive")
        connection.execute(
            update(ws.private_job_queues).values(locked_at=func.now(), locked_by="pool-dead")
        )
        result = connection.execute(select(gw.force_unlock_workers(["pool-dead", "pool-other"])))
        assert result.scalar() is None  # returns void
        jobs = dict(
            connection.execute(select(ws.private_jobs.c.id, ws.private_jobs.c.locked_by)).all()
        )
        queue = connection.execute(
            select(ws.private_job_queues.c.locked_at, ws.private_job_queues.c.locked_by)
        ).one()
        attempts = connection.scalar(
            select(ws.private_jobs.c.attempts).where(ws.private_jobs.c.id == dead.id)
        )
    assert jobs == {dead.id: None, alive.id: "pool-alive"}
    assert tuple(queue) == (None, None)
    assert attempts == 1  # unlocking does not touch attempts


def test_rows_of_is_a_from_item_with_private_jobs_columns(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    rows = gw.rows_of(gw.add_job("rows"), name="added")
    assert [c.name for c in rows.columns] == PRIVATE_JOB_COLUMNS
    sql = str(select(rows.c.id).compile(dialect=engine.dialect))
    assert f'FROM {schema}."add_job"(' in sql and "AS added" in sql
    with engine.begin() as connection:
        ids = connection.execute(select(rows.c.id, rows.c.task_id).where(rows.c.id > 0)).all()
        task = connection.scalar(
            select(worker_schema(schema).private_tasks.c.identifier).where(
                worker_schema(schema).private_tasks.c.id == ids[0].task_id
            )
        )
    assert len(ids) == 1 and task == "rows"


# --- the showcase: one job per selected row, inside the caller's ORM transaction -------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = f"showcase_users_{secrets.token_hex(3)}"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))
    wants_newsletter: Mapped[bool] = mapped_column(Boolean)


@pytest.fixture
def users(engine: Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                User(id=1, email="ada@example.com", wants_newsletter=True),
                User(id=2, email="bob@example.com", wants_newsletter=False),
                User(id=3, email="cy@example.com", wants_newsletter=True),
                User(id=4, email="di@example.com", wants_newsletter=True),
            ]
        )
    yield
    Base.metadata.drop_all(engine)


def _enqueue_newsletter(gw: WorkerFunctions) -> Any:
    subscribers = select(User).where(User.wants_newsletter).subquery()
    return select(
        gw.add_job(
            "send_email",
            func.json_build_object("user_id", subscribers.c.id, "to", subscribers.c.email),
            queue_name="email",
        )
    ).select_from(subscribers)


def _email_jobs(engine: Engine, schema: str) -> list[tuple[Any, ...]]:
    ws = worker_schema(schema)
    j, t, q = ws.private_jobs, ws.private_tasks, ws.private_job_queues
    with engine.connect() as connection:
        rows = connection.execute(
            select(t.c.identifier, q.c.queue_name, j.c.payload)
            .select_from(j.join(t, t.c.id == j.c.task_id).outerjoin(q, q.c.id == j.c.job_queue_id))
            .order_by(j.c.id)
        ).all()
    return [tuple(r) for r in rows]


@pytest.mark.usefixtures("users")
def test_enqueue_one_job_per_selected_user_rolled_back(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with Session(engine) as session:
        session.add(User(id=5, email="eve@example.com", wants_newsletter=True))
        session.flush()
        enqueued = session.execute(_enqueue_newsletter(gw)).all()
        assert len(enqueued) == 4  # visible inside the transaction, eve included
        assert _email_jobs(engine, schema) == []  # but not outside it
        session.rollback()
    assert _email_jobs(engine, schema) == []
    with Session(engine) as session:
        assert session.get(User, 5) is None


@pytest.mark.usefixtures("users")
def test_enqueue_one_job_per_selected_user_committed(engine: Engine, schema: str) -> None:
    gw = worker_functions(schema)
    with Session(engine) as session:
        session.execute(_enqueue_newsletter(gw))
        assert _email_jobs(engine, schema) == []
        session.commit()
    jobs = _email_jobs(engine, schema)
    assert sorted(jobs, key=lambda job: job[2]["user_id"]) == [
        ("send_email", "email", {"user_id": 1, "to": "ada@example.com"}),
        ("send_email", "email", {"user_id": 3, "to": "cy@example.com"}),
        ("send_email", "email", {"user_id": 4, "to": "di@example.com"}),
    ]


# --- bad input at use time -----------------------------------------------------------------


def test_a_role_that_does_not_own_the_schema_gets_not_schema_owner(
    engine: Engine, schema: str, login_role: tuple[str, str]
) -> None:
    role, url = login_role
    quoted = quote_schema(schema)
    with engine.begin() as connection:
        connection.execute(text(f'grant usage on schema {quoted} to "{role}"'))
        connection.execute(text(f'grant execute on all functions in schema {quoted} to "{role}"'))
    gw = worker_functions(schema)
    other = engine_from_url(url, poolclass=NullPool)
    try:
        with pytest.raises(DBAPIError) as info, other.begin() as connection:
            connection.execute(select(gw.add_job("as_other_role")))
    finally:
        other.dispose()
    error = translate_db_error(info.value, schema=schema)
    assert isinstance(error, NotSchemaOwner)
    message = str(error)
    assert repr(schema) in message
    assert "connect as the role that owns it" in message
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(worker_schema(schema).jobs)) == 0


@pytest.mark.parametrize("precreated", [False, True], ids=["no-schema", "empty-schema"])
def test_functions_on_an_unmigrated_schema_raise_schema_not_migrated(
    engine: Engine, schema_name: str, precreated: bool
) -> None:
    if precreated:
        with engine.begin() as connection:
            connection.execute(text(f"create schema {quote_schema(schema_name)}"))
    gw = worker_functions(schema_name)
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        connection.execute(select(gw.add_job("never")))
    error = translate_db_error(info.value, schema=schema_name)
    assert isinstance(error, SchemaNotMigrated)
    message = str(error)
    assert schema_name in message
    assert "graphile-worker migrate" in message and "alembic upgrade" in message


def test_unrelated_database_errors_are_not_translated(engine: Engine, schema: str) -> None:
    with pytest.raises(DBAPIError) as info, engine.begin() as connection:
        connection.execute(text("select * from no_such_table_here"))
    assert translate_db_error(info.value, schema=schema) is None
