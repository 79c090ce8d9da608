"""Shared helpers and fixtures of the WorkerUtils tests (``tests/integration/test_utils_*.py``).

Everything here talks to the real test database: jobs are put into states by plain SQL
on ``_private_jobs``, statements are observed with SQLAlchemy's ``before_cursor_execute``
event, notifications are read by a separate psycopg connection.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import psycopg
import pytest
from pydantic import BaseModel
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from sqla_graphile import AsyncWorkerUtils, BatchTaskHandler, TaskHandler, WorkerUtils, migrate
from sqla_graphile._urls import async_engine_from_url, engine_from_url
from sqla_graphile.schema import quote_schema

# -- one migrated schema per test module, emptied before each test -------------------


@pytest.fixture(scope="module")
def module_schema(engine: Engine) -> Iterator[str]:
    """A worker schema migrated once for a whole test module."""
    name = f"gw_{secrets.token_hex(4)}"
    migrate(engine, schema=name)
    yield name
    execute(engine, f"drop schema if exists {quote_schema(name)} cascade")


@pytest.fixture
def schema(engine: Engine, module_schema: str) -> str:
    """A migrated worker schema holding no job, task, queue or business row.

    Overrides conftest's ``schema`` (a schema migrated for each test): migrating costs far
    more than emptying. Identity values are not reset, so ids are never reused.
    """
    name = quote_schema(module_schema)
    with engine.begin() as connection:
        connection.execute(text("set local lock_timeout = '10s'"))
        connection.execute(
            text(
                f"truncate {name}._private_jobs, {name}._private_tasks, {name}._private_job_queues"
            )
        )
        connection.execute(text(f"drop table if exists {name}.business"))
    return module_schema


# -- typed tasks used by the tests ------------------------------------------------------


@dataclass
class SendEmail(TaskHandler):
    IDENTIFIER: ClassVar[str] = "send_email"
    to: str
    cc: list[str] = field(default_factory=list)


class Invoice(BaseModel, TaskHandler):
    IDENTIFIER: ClassVar[str] = "invoice"
    number: int
    amount: float
    issued: datetime | None = None


@dataclass
class Thumb(BatchTaskHandler):
    IDENTIFIER: ClassVar[str] = "thumb"
    path: str


@dataclass
class Measure(TaskHandler):
    IDENTIFIER: ClassVar[str] = "measure"
    value: float


# -- awaiting either twin ------------------------------------------------------------


async def call(value: Any) -> Any:
    """The result of a sync call, or of an awaited async one."""
    return await value if inspect.isawaitable(value) else value


# -- reading and shaping rows ----------------------------------------------------------


def q(schema: str) -> str:
    """The quoted schema name, for hand-written test SQL."""
    return quote_schema(schema)


def job_rows(engine: Engine, schema: str) -> list[dict[str, Any]]:
    """Every job row, with its task identifier and queue name, ordered by id."""
    with engine.connect() as connection:
        result = connection.execute(
            text(
                f"select j.*, t.identifier as task_identifier, q.queue_name "
                f"from {q(schema)}._private_jobs j "
                f"join {q(schema)}._private_tasks t on t.id = j.task_id "
                f"left join {q(schema)}._private_job_queues q on q.id = j.job_queue_id "
                f"order by j.id"
            )
        )
        return [dict(row) for row in result.mappings()]


def job_row(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    """One job row by id (``None`` when it does not exist)."""
    for row in job_rows(engine, schema):
        if row["id"] == job_id:
            return row
    return None


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    """One value of a query on a fresh connection."""
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def execute(engine: Engine, sql: str, **params: Any) -> None:
    """Run and commit one statement."""
    with engine.begin() as connection:
        connection.execute(text(sql), params)


def lock_job(engine: Engine, schema: str, job_id: int, worker: str = "test-worker") -> None:
    """Make a job look running: locked now by ``worker``, one attempt used."""
    execute(
        engine,
        f"update {q(schema)}._private_jobs set locked_at = now(), locked_by = :w, "
        "attempts = attempts + 1 where id = :id",
        w=worker,
        id=job_id,
    )


def fail_job(engine: Engine, schema: str, job_id: int, message: str = "boom") -> None:
    """Make a job look failed once and waiting for its retry."""
    execute(
        engine,
        f"update {q(schema)}._private_jobs set attempts = 1, last_error = :m where id = :id",
        m=message,
        id=job_id,
    )


def permafail_job(engine: Engine, schema: str, job_id: int, message: str = "gone") -> None:
    """Make a job look permanently failed."""
    execute(
        engine,
        f"update {q(schema)}._private_jobs set attempts = max_attempts, last_error = :m "
        "where id = :id",
        m=message,
        id=job_id,
    )


# -- observing statements -------------------------------------------------------------


@dataclass
class StatementLog:
    """Every SQL statement a bind's connections send (an event listener, not a mock)."""

    statements: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def matching(self, needle: str) -> list[str]:
        return [s for s in self.statements if needle.lower() in s.lower()]


@contextmanager
def statement_log(target: Engine | Connection) -> Iterator[StatementLog]:
    """Record the statements sent through ``target`` while the block runs."""
    log = StatementLog()
    event.listen(target, "before_cursor_execute", log)
    try:
        yield log
    finally:
        event.remove(target, "before_cursor_execute", log)


# -- LISTEN "jobs:insert" -------------------------------------------------------------


class Listener:
    """A separate psycopg connection listening on ``jobs:insert``.

    ``drain()`` sends a marker notification from yet another connection and returns the
    ``jobs:insert`` payloads received before it: PostgreSQL delivers notifications in
    commit order, so that is exactly what was committed so far, without any sleeping.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = psycopg.connect(url, autocommit=True)
        self.connection.execute('listen "jobs:insert"')

    def drain(self, timeout: float = 10.0) -> list[str]:
        marker = f"marker-{secrets.token_hex(8)}"
        with psycopg.connect(self.url, autocommit=True) as sender:
            sender.execute("select pg_notify('jobs:insert', %s)", (marker,))
        received: list[str] = []
        for notify in self.connection.notifies(timeout=timeout):
            if notify.payload == marker:
                return received
            received.append(notify.payload)
        raise AssertionError(f"the marker notification did not arrive within {timeout}s")

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def listener(database_url: str) -> Iterator[Listener]:
    """A ``LISTEN "jobs:insert"`` connection to the test database."""
    url = make_url(database_url).set(drivername="postgresql")
    listening = Listener(url.render_as_string(hide_password=False))
    listening.drain()  # start from a clean slate
    yield listening
    listening.close()


# -- the six bind kinds, on every driver -----------------------------------------------

SYNC_DRIVERS = ("psycopg", "psycopg2")
ASYNC_DRIVERS = ("psycopg_async", "asyncpg")
CALLER_KINDS = ("Connection", "Session", "AsyncConnection", "AsyncSession")
BIND_KINDS = ("Engine", *CALLER_KINDS[:2], "AsyncEngine", *CALLER_KINDS[2:])


def kind_driver_params(kinds: tuple[str, ...]) -> list[Any]:
    """``(kind, driver)`` pairs: sync kinds on psycopg/psycopg2, async on psycopg/asyncpg."""
    params = []
    for kind in kinds:
        drivers = ASYNC_DRIVERS if kind.startswith("Async") else SYNC_DRIVERS
        params.extend(pytest.param(kind, driver, id=f"{kind}-{driver}") for driver in drivers)
    return params


def driver_url(database_url: str, driver: str) -> str:
    """The test database's URL for one driver."""
    url = make_url(database_url).set(drivername=f"postgresql+{driver}")
    return url.render_as_string(hide_password=False)


@dataclass
class CallerTransaction:
    """A caller's transaction on one bind kind, and utils bound to that bind.

    For ``Engine``/``AsyncEngine`` the utils hold the engine itself (each call commits on
    its own) while the caller's business writes run in a transaction of their own.
    """

    kind: str
    utils: WorkerUtils | AsyncWorkerUtils
    business: Callable[[str], Any]
    commit: Callable[[], Any]
    rollback: Callable[[], Any]
    joins_caller: bool

    async def add(self, identifier: str = "tx_job", payload: Any = None, spec: Any = None) -> Any:
        return await call(self.utils.add_raw_job(identifier, payload, spec))


class BindFactory:
    """Opens caller transactions of any bind kind and driver on one worker schema."""

    def __init__(self, database_url: str, schema: str, stack: AsyncExitStack) -> None:
        self.database_url = database_url
        self.schema = schema
        self.stack = stack
        self._sync: dict[str, Engine] = {}
        self._async: dict[str, AsyncEngine] = {}

    def sync_engine(self, driver: str) -> Engine:
        if driver not in self._sync:
            self._sync[driver] = engine_from_url(driver_url(self.database_url, driver))
        return self._sync[driver]

    def async_engine(self, driver: str) -> AsyncEngine:
        if driver not in self._async:
            self._async[driver] = async_engine_from_url(driver_url(self.database_url, driver))
        return self._async[driver]

    def _insert(self) -> str:
        return f"insert into {q(self.schema)}.business (note) values (:note)"

    async def open(self, kind: str, driver: str, **utils_kw: Any) -> CallerTransaction:
        insert = text(self._insert())
        if kind in ("Engine", "Connection", "Session"):
            engine = self.sync_engine(driver)
            if kind == "Session":
                session = self.stack.enter_context(Session(engine))
                session.begin()
                return CallerTransaction(
                    kind,
                    WorkerUtils(session, self.schema, **utils_kw),
                    lambda note: session.execute(insert, {"note": note}),
                    session.commit,
                    session.rollback,
                    True,
                )
            connection = self.stack.enter_context(engine.connect())
            connection.begin()
            bind: Any = engine if kind == "Engine" else connection
            return CallerTransaction(
                kind,
                WorkerUtils(bind, self.schema, **utils_kw),
                lambda note: connection.execute(insert, {"note": note}),
                connection.commit,
                connection.rollback,
                kind != "Engine",
            )
        aengine = self.async_engine(driver)
        if kind == "AsyncSession":
            asession = await self.stack.enter_async_context(AsyncSession(aengine))
            await asession.begin()
            return CallerTransaction(
                kind,
                AsyncWorkerUtils(asession, self.schema, **utils_kw),
                lambda note: asession.execute(insert, {"note": note}),
                asession.commit,
                asession.rollback,
                True,
            )
        aconnection = await self.stack.enter_async_context(aengine.connect())
        await aconnection.begin()
        abind: Any = aengine if kind == "AsyncEngine" else aconnection
        return CallerTransaction(
            kind,
            AsyncWorkerUtils(abind, self.schema, **utils_kw),
            lambda note: aconnection.execute(insert, {"note": note}),
            aconnection.commit,
            aconnection.rollback,
            kind != "AsyncEngine",
        )

    async def dispose(self) -> None:
        for engine in self._sync.values():
            engine.dispose()
        for aengine in self._async.values():
            await aengine.dispose()


@pytest.fixture
async def binds(database_url: str, schema: str, engine: Engine) -> AsyncIterator[BindFactory]:
    """Caller transactions of every bind kind, with a ``business`` table in the schema."""
    execute(engine, f"create table {q(schema)}.business (id serial primary key, note text)")
    async with AsyncExitStack() as stack:
        factory = BindFactory(database_url, schema, stack)
        stack.push_async_callback(factory.dispose)
        yield factory


def business_notes(engine: Engine, schema: str) -> list[str]:
    """The committed notes of the business table."""
    with engine.connect() as connection:
        return list(
            connection.execute(text(f"select note from {q(schema)}.business order by id"))
            .scalars()
            .all()
        )


# -- concurrency helper ---------------------------------------------------------------


class InThread:
    """Run a callable in a thread and keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the call in the thread did not finish")
        if self.error is not None:
            raise self.error
        return self.result


def wait_until_blocked(engine: Engine, pid: int, timeout: float = 30.0) -> None:
    """Wait until backend ``pid`` waits for a lock another transaction holds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = "select count(*) from pg_locks where pid = :pid and not granted"
        if scalar(engine, waiting, pid=pid):
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} never blocked on a lock")
