"""The idle worker's quick fetch: a notified job locked and started from socket callbacks.

An idle worker woken by ``jobs:insert`` would resume its fetch task, send the single-job
fetch through psycopg's asyncio machinery, and resume again for the answer: turns of the
event loop and a good deal of Python between the notification and the handler, which is
exactly what an idle worker's pick-up latency is made of. Here the same statement,
prepared once on the fetcher's held connection under a name of ours, is sent from the
listener's callback, its answer read in a reader callback on that connection's socket,
and the job started right there.

Only the happy path is quick. Anything else (an error, an empty answer, a connection not
ready) hands the fetch back to the fetch task, which runs it the usual way with its
retries, logging and task-id look-up. The fetch task is parked while a quick fetch is in
flight and waits for it to settle before using the connection again, so the two never
share the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect

from .._sqlalchemy import literal_parameters

__all__ = ["QuickFetch"]

logger = logging.getLogger("sqla_graphile.worker")

# Positional ($1, $2 …) placeholders, as a protocol-level prepared statement takes them.
_DIALECT = psycopg_dialect.dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


class QuickFetch:
    """Runs one prepared fetch statement on a psycopg connection from loop callbacks.

    ``on_rows(rows)`` gets the answer's rows as tuples; ``on_fallback()`` is called
    instead when the quick fetch could not be completed (nothing was locked by it, or
    whatever it locked is the fetch task's to find: it fetches at once).
    """

    def __init__(
        self,
        statement: Any,
        *,
        on_rows: Callable[[list[tuple[Any, ...]]], None],
        on_fallback: Callable[[], None],
    ) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        sql = compiled.string
        # The name carries the statement's digest: a connection of a shared pool may
        # already hold it, prepared by another worker, for this schema and no other.
        digest = hashlib.sha256(sql.encode()).hexdigest()[:20]
        self._name = f"sqla_graphile_fetch_{digest}"
        self._prepare_sql = f"PREPARE {self._name} AS {sql}".encode()
        self._order: Sequence[str] = compiled.positiontup or ()
        self._defaults = literal_parameters(compiled)
        self._on_rows = on_rows
        self._on_fallback = on_fallback
        self._raw: psycopg.AsyncConnection[Any] | None = None
        self._refused: psycopg.AsyncConnection[Any] | None = None
        self._transformer: Any = None  # a psycopg Transformer
        self._results: list[pq.abc.PGresult] = []
        self._flight: asyncio.Future[None] | None = None
        self._socket = -1

    async def prepare(self, raw: psycopg.AsyncConnection[Any] | None) -> bool:
        """Make the statement ready on ``raw`` (the fetcher's idle connection)."""
        if raw is None or raw is self._refused:
            return False
        if raw is self._raw:
            return True
        self._raw = None
        try:
            await raw.execute(self._prepare_sql)
        except psycopg.errors.DuplicatePreparedStatement:
            pass  # prepared by an earlier worker on this pooled connection: the same SQL
        except psycopg.Error as exc:
            # Not fatal: the fetch task keeps fetching the usual way on this connection.
            logger.debug("quick fetch unavailable on this connection: %s", exc)
            self._refused = raw
            return False
        self._raw, self._transformer = raw, Transformer(raw)
        return True

    def start(self, params: dict[str, Any]) -> bool:
        """Send the fetch now (from a loop callback); whether it was sent."""
        raw = self._raw
        if raw is None or self._flight is not None or self._transformer is None:
            return False
        pgconn = raw.pgconn
        if raw.closed or raw.broken or pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return False
        values = {**self._defaults, **params}
        ordered = [values[name] for name in self._order]
        loop = asyncio.get_running_loop()
        try:
            dumped = self._transformer.dump_sequence(ordered, [PyFormat.TEXT] * len(ordered))
            pgconn.send_query_prepared(self._name.encode(), dumped, result_format=pq.Format.BINARY)
            self._socket = pgconn.socket
            if pgconn.flush():  # rare for so small a message: the rest when writable
                loop.add_writer(self._socket, self._writable)
            loop.add_reader(self._socket, self._readable)
        except Exception as exc:
            logger.debug("quick fetch not sent: %s", exc)
            self._raw = None
            return False
        self._flight = loop.create_future()
        return True

    async def settled(self) -> None:
        """Return once no quick fetch is in flight."""
        while self._flight is not None:
            await asyncio.shield(self._flight)

    def _writable(self) -> None:
        try:
            assert self._raw is not None
            if self._raw.pgconn.flush():
                return
        except Exception as exc:
            self._finish(None, exc)
            return
        asyncio.get_running_loop().remove_writer(self._socket)

    def _readable(self) -> None:
        try:
            assert self._raw is not None
            pgconn = self._raw.pgconn
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    break
                self._results.append(result)
            else:
                return  # more of the answer is on its way
        except Exception as exc:
            self._finish(None, exc)
            return
        results, self._results = self._results, []
        if len(results) == 1 and results[0].status == pq.ExecStatus.TUPLES_OK:
            self._finish(results[0], None)
        else:
            message = results[-1].error_message.decode(errors="replace").strip() if results else ""
            self._finish(None, RuntimeError(message or "no answer"))

    def _finish(self, result: pq.abc.PGresult | None, error: BaseException | None) -> None:
        # The socket noted at the start: a lost connection no longer tells its number.
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._socket)
        loop.remove_writer(self._socket)
        flight, self._flight = self._flight, None
        self._results = []
        try:
            if result is None:
                # The fetch task fetches at once and deals with the error, if it stays.
                logger.debug("quick fetch failed; fetching the usual way: %s", error)
                self._raw = None
                self._on_fallback()
                return
            transformer = self._transformer
            assert transformer is not None
            transformer.set_pgresult(result)
            self._on_rows(transformer.load_rows(0, result.ntuples, tuple))
        except Exception:  # a bug of ours: the fetch task takes over
            logger.exception("handling a quick fetch's answer failed")
            self._on_fallback()
        finally:
            if flight is not None and not flight.done():
                flight.set_result(None)
