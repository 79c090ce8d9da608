"""The worker's connection seam: every statement it sends goes through :class:`Database`.

Each statement is one autocommit round trip on a psycopg connection, bounded by the
worker's ``statement_timeout``. A statement that overruns it has its socket shut down
(no cancel request, no waiting on a link that may be silent), its connection discarded,
and, if the caller allows, is retried on a fresh one. Every connection gets TCP
keepalives and ``TCP_USER_TIMEOUT``, so a half-open link is noticed by the kernel too.

:class:`HeldConnection` keeps one connection for one role (the fetcher, each writer):
no pool checkout per statement, and psycopg prepares the statements server-side after a
few runs. When the pool cannot spare connections for good, it borrows one per statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from .._backoff import Backoff
from .._drive import Op
from .._sqlalchemy import bind_processors, literal_parameters, pool_max_overflow, result_of_rows
from ..errors import InvalidArgumentType, is_transient, translate_db_error
from ..sql import is_idempotent
from ._aio import bounded

__all__ = [
    "Database",
    "HeldConnection",
    "StatementTimeout",
    "is_transient",
    "keepalive_options",
    "sever",
]

logger = logging.getLogger("sqla_graphile.worker")
_T = TypeVar("_T")

# TCP keepalive: probe an idle link after 10 s, every 5 s, give up after 3 unanswered.
_KEEPALIVE = (10, 5, 3)
# Retries of a worker statement: transient errors up to 30 s apart; a statement that
# retries any error (its outcome must be written) every few seconds at most.
_RETRY_TRANSIENT = Backoff(first=0.05, factor=1.5, cap=30.0)
_RETRY_ANY = Backoff(first=0.05, factor=1.5, cap=5.0)


class StatementTimeout(TimeoutError):
    """A worker statement got no answer within ``statement_timeout``; its link was cut."""


def keepalive_options(statement_timeout: float) -> dict[str, Any]:
    """Libpq connection options: keepalives and a TCP user timeout for unacknowledged data."""
    idle, interval, count = _KEEPALIVE
    return {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": count,
        "tcp_user_timeout": int(max(statement_timeout, 1.0) * 1000),
    }


def worker_engine(
    bind: AsyncEngine | URL, private: bool, concurrency: int, statement_timeout: float
) -> tuple[AsyncEngine, bool]:
    """The async psycopg engine a worker runs on, and whether the worker made it (owns it).

    An application's psycopg ``AsyncEngine`` is used as it is unless ``private``; from a
    URL (or another driver's engine) the worker makes its own: enough connections for
    the fetcher, both writers, the sweeps, the heartbeat and handlers' async utilities,
    without ever waiting on the pool for a write.
    """
    if isinstance(bind, AsyncEngine):
        if not private and bind.dialect.driver == "psycopg":
            return bind, False
        url = bind.url
    else:
        url = bind
    engine = create_async_engine(
        url.set(drivername="postgresql+psycopg_async"),
        pool_size=7,
        max_overflow=concurrency,
        connect_args=keepalive_options(statement_timeout),
    )
    return engine, True


def listen_kwargs(engine: AsyncEngine, statement_timeout: float) -> dict[str, Any]:
    """Psycopg connection arguments for the LISTEN connection, from ``engine``'s URL."""
    url = engine.url.set(drivername="postgresql+psycopg_async")
    dialect = create_async_engine(url).dialect  # parses only, never connects
    _args, kwargs = dialect.create_connect_args(url)
    kwargs.pop("context", None)
    kwargs.setdefault("application_name", "sqla_graphile listener")
    for key, value in keepalive_options(statement_timeout).items():
        kwargs.setdefault(key, value)
    return dict(kwargs)


def configure_engine(engine: AsyncEngine, statement_timeout: float) -> None:
    """Give each new connection of ``engine``'s pool keepalives and a TCP user timeout.

    Set on the socket after connecting, so an engine the application made is covered
    too; the options are harmless to its other uses.
    """
    sync = engine.sync_engine
    if sync in _configured:
        return

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        with contextlib.suppress(Exception):
            set_keepalive(dbapi_connection.fileno(), statement_timeout)

    event.listen(sync, "connect", on_connect)
    _configured.add(sync)


# The engines configure_engine() has given its listener.
_configured: weakref.WeakSet[Engine] = weakref.WeakSet()


def set_keepalive(fileno: int, statement_timeout: float) -> None:
    """TCP keepalives and ``TCP_USER_TIMEOUT`` on a connected socket (TCP only)."""
    sock = socket.socket(fileno=fileno)
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = _KEEPALIVE
        for name, value in (
            ("TCP_KEEPIDLE", idle),
            ("TCP_KEEPINTVL", interval),
            ("TCP_KEEPCNT", count),
            ("TCP_USER_TIMEOUT", int(max(statement_timeout, 1.0) * 1000)),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    finally:
        sock.detach()  # the socket belongs to libpq


def sever(fileno: int) -> None:
    """Shut a connection's socket down: whatever waits on it fails at once."""
    if fileno < 0:
        return
    sock = socket.socket(fileno=fileno)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    finally:
        sock.detach()


class _Compiled:
    """A worker statement compiled once for psycopg."""

    __slots__ = ("defaults", "names", "processors", "sql")

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        # Literal values SQLAlchemy turned into parameters of their own.
        self.defaults = {
            key: value for key, value in literal_parameters(compiled).items() if value is not None
        }
        self.processors = bind_processors(compiled)
        self.names: tuple[str, ...] | None = None
        """The result's column names, read from the first result's description."""

    def params(self, values: dict[str, Any]) -> dict[str, Any]:
        params = dict(self.defaults)
        processors = self.processors
        for key, value in values.items():
            process = processors.get(key)
            params[key] = value if process is None or value is None else process(value)
        return params


class UndecodableRow:
    """A fetched row whose values could not be loaded; its first column (the id) could."""

    __slots__ = ("error", "id")

    def __init__(self, id: int, error: BaseException) -> None:
        self.id = id
        self.error = error


class HeldConnection:
    """A psycopg connection of the worker's pool kept for one role (or borrowed each time).

    Statements are Core objects compiled once. A failed connection is invalidated and
    replaced on the next call; errors are raised wrapped as SQLAlchemy's.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        timeout: float,
        *,
        keep: bool = True,
        compiled: dict[int, _Compiled] | None = None,
    ) -> None:
        self._engine = engine
        self._timeout = timeout
        self.keep = keep
        self._connection: AsyncConnection | None = None
        self._raw: psycopg.AsyncConnection[Any] | None = None
        self._cursor: psycopg.AsyncCursor[Any] | None = None
        self._compiled: dict[int, _Compiled] = {} if compiled is None else compiled
        self._lock = asyncio.Lock()

    async def run(
        self,
        statement: Any,
        params: dict[str, Any],
        *,
        binary: bool = False,
        timeout: float | None = None,
    ) -> tuple[tuple[str, ...], list[Any]]:
        """The statement's column names and rows (tuples); ``binary``: in binary format.

        With ``binary``, a row that cannot be loaded comes as an :class:`UndecodableRow`.
        """
        async with self._lock:
            try:
                raw = self._raw
                if raw is None:
                    # A new link may be as silent as the old: connecting is bounded too.
                    limit = self._timeout if timeout is None else timeout
                    try:
                        raw = await bounded(self._connect(), limit)
                    except asyncio.TimeoutError:
                        raise StatementTimeout(f"no connection within {limit:g} s") from None
                return await self._execute(raw, statement, params, binary, timeout)
            finally:
                if not self.keep:
                    await self.release()

    async def _execute(
        self,
        raw: psycopg.AsyncConnection[Any],
        statement: Any,
        params: dict[str, Any],
        binary: bool,
        timeout: float | None,
    ) -> tuple[tuple[str, ...], list[Any]]:
        cursor = self._cursor
        assert cursor is not None
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = _Compiled(statement, self._engine.dialect)
        try:
            fileno = raw.pgconn.socket
        except psycopg.OperationalError:
            fileno = -1  # already broken: the statement below fails at once
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            sever(fileno)

        timer = asyncio.get_running_loop().call_later(
            self._timeout if timeout is None else timeout, expire
        )
        try:
            # Binary results load faster (timestamps above all); every column a caller
            # asking for them takes loads to the same value either way.
            await cursor.execute(compiled.sql, compiled.params(params), binary=binary)
            names = compiled.names
            if names is None:
                if cursor.description is None:
                    return (), []
                names = compiled.names = tuple(column.name for column in cursor.description)
            if binary:
                try:
                    return names, await cursor.fetchall()
                except psycopg.DataError:
                    return names, await _rows_one_by_one(cursor)
            return names, await cursor.fetchall()
        except psycopg.Error as exc:
            broken = (
                timed_out
                or raw.broken
                or raw.closed
                or raw.pgconn.status != psycopg.pq.ConnStatus.OK
            )
            if broken:
                await self.release(invalidate=True)
            if timed_out:
                raise StatementTimeout(
                    f"no answer within {self._timeout:g} s (statement_timeout); "
                    "the connection was discarded"
                ) from exc
            raise DBAPIError.instance(
                compiled.sql,
                params,
                exc,
                psycopg.Error,
                connection_invalidated=broken,
                dialect=self._engine.dialect,
            ) from exc
        except BaseException:
            # Cancelled mid-statement: the session's state is unknown.
            await self.release(invalidate=True)
            raise
        finally:
            timer.cancel()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        connection = await self._engine.connect()
        try:
            raw = (await connection.get_raw_connection()).driver_connection
        except BaseException:
            await connection.close()
            raise
        if not isinstance(raw, psycopg.AsyncConnection) or not raw.autocommit:
            await connection.close()
            raise InvalidArgumentType("the worker needs psycopg's async driver in autocommit")
        self._connection, self._raw, self._cursor = connection, raw, raw.cursor()
        return raw

    def backend_pid(self) -> int | None:
        """The server process id of the held connection, or ``None`` when none is held."""
        raw = self._raw if self.keep else None
        if raw is None or raw.closed:
            return None
        return raw.info.backend_pid

    @property
    def raw(self) -> psycopg.AsyncConnection[Any] | None:
        """The psycopg connection held right now (``None`` between connections)."""
        return self._raw if self.keep else None

    def sever(self) -> None:
        """Cut the held connection's link (a statement on it fails at once)."""
        raw = self._raw
        if raw is not None and not raw.closed:
            with contextlib.suppress(psycopg.OperationalError):
                sever(raw.pgconn.socket)

    async def release(self, *, invalidate: bool = False) -> None:
        """Give the connection back (discarded with ``invalidate``)."""
        connection, self._connection, self._raw = self._connection, None, None
        self._cursor = None
        if connection is None:
            return
        try:
            if invalidate:
                await connection.invalidate()
            await connection.close()
        except Exception:  # a broken connection may fail to close; it is gone either way
            logger.debug("error releasing a worker connection", exc_info=True)


async def _rows_one_by_one(cursor: psycopg.AsyncCursor[Any]) -> list[Any]:
    """The rows of a result that failed to load as a whole, a bad one as UndecodableRow."""
    pgresult = cursor.pgresult
    count = pgresult.ntuples if pgresult is not None else 0
    rows: list[Any] = []
    for index in range(count):
        await cursor.scroll(index, mode="absolute")
        try:
            rows.append(await cursor.fetchone())
        except psycopg.DataError as exc:
            assert pgresult is not None
            value = pgresult.get_value(index, 0) or b""
            rows.append(UndecodableRow(int.from_bytes(value, "big", signed=True), exc))
    return rows


def pool_has_room(engine: AsyncEngine, held: int) -> bool:
    """Whether ``engine``'s pool can lend ``held`` connections for good and still serve.

    Two more are left for the sweep, returns and handlers' async utilities.
    """
    pool = engine.sync_engine.pool
    if isinstance(pool, NullPool):
        return True
    if isinstance(pool, QueuePool):
        max_overflow = pool_max_overflow(pool)
        return max_overflow < 0 or pool.size() + max_overflow >= held + 2
    return False


class Database:
    """Runs the worker's statements: autocommit, timed out, retried when transient.

    ``deadline`` (a :func:`time.monotonic` value), once set, ends retries at that time:
    a shutdown then finishes whatever the network does.
    """

    def __init__(self, engine: AsyncEngine, schema: str, statement_timeout: float) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.schema = schema
        self.statement_timeout = statement_timeout
        self.deadline: float | None = None
        self.failing = False
        """A statement failed on a lost link or a busy server; cleared by a success."""
        self._compiled: dict[int, _Compiled] = {}

    def held(self, count: int) -> list[HeldConnection]:
        """Connections kept for ``count`` roles (borrowed per statement if no room)."""
        keep = pool_has_room(self.engine, count)
        return [self._connection(keep) for _ in range(count)]

    def _connection(self, keep: bool) -> HeldConnection:
        return HeldConnection(
            self.engine, self.statement_timeout, keep=keep, compiled=self._compiled
        )

    async def execute(
        self,
        statement: Any,
        params: dict[str, Any],
        *,
        what: str,
        retries: int = 100,
        retry_any: bool = False,
        held: HeldConnection | None = None,
        binary: bool = False,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> list[Any]:
        """Run one autocommit statement and return its rows, retrying transient errors.

        ``held``: run it on that connection. The rows are tuples (``binary``: loaded
        from the binary format). ``on_retry(error)`` is told of each failed attempt
        retried.
        """
        _names, rows = await self._run(
            statement, params, what, retries, retry_any, held, binary, on_retry
        )
        return rows

    async def drive(
        self,
        op: Op[_T],
        *,
        what: str,
        retries: int = 100,
        retry_any: bool = False,
        held: HeldConnection | None = None,
        binary: bool = False,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> _T:
        """Run operation ``op`` (see :mod:`sqla_graphile._drive`) to its end; its value.

        Each of its statements runs as :meth:`execute` runs one, with these options;
        the operation reads the rows as a SQLAlchemy ``Result``.
        """
        try:
            request = next(op)
            while True:
                statement, params = request
                names, rows = await self._run(
                    statement, dict(params), what, retries, retry_any, held, binary, on_retry
                )
                request = op.send(result_of_rows(names, rows))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _run(
        self,
        statement: Any,
        params: dict[str, Any],
        what: str,
        retries: int,
        retry_any: bool,
        held: HeldConnection | None,
        binary: bool,
        on_retry: Callable[[BaseException], None] | None,
    ) -> tuple[tuple[str, ...], list[Any]]:
        connection = held if held is not None else self._connection(False)
        backoff = _RETRY_ANY if retry_any else _RETRY_TRANSIENT
        if on_retry is None and is_idempotent(statement) is False:
            # A second run would do more than the first (whose reply may be what was
            # lost), and no guard would find out what the first did: no retry.
            retries = 1
        attempt = 0
        while True:
            attempt += 1
            timeout = self.statement_timeout
            if self.deadline is not None:
                timeout = max(0.05, min(timeout, self.deadline - time.monotonic()))
            try:
                answer = await connection.run(statement, params, binary=binary, timeout=timeout)
            except (DBAPIError, PoolTimeoutError, OSError) as exc:
                if is_transient(exc):  # the link or the server, not the statement
                    self.failing = True
                delay = backoff.delay(attempt)
                late = self.deadline is not None and time.monotonic() + delay >= self.deadline
                if late or attempt >= retries or not (retry_any or is_transient(exc)):
                    if isinstance(exc, DBAPIError):
                        translated = translate_db_error(exc, schema=self.schema)
                        if translated is not None:
                            raise translated from exc
                    raise
                if on_retry is not None:
                    on_retry(exc)
                logger.warning(
                    "%s failed (attempt %d, retrying in %.2f s): %s",
                    what,
                    attempt,
                    delay,
                    first_line(exc),
                )
                await asyncio.sleep(delay)
            else:
                self.failing = False
                return answer


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ids_of(rows: Sequence[Any]) -> set[int]:
    """The first column of each row (the statements return the job id first)."""
    return {row[0] for row in rows}
