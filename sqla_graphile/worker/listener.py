"""The worker's LISTEN connection: wake-ups on ``jobs:insert``, stops on ``worker:migrate``.

It holds one psycopg connection of its own, outside any pool: a LISTEN lives as long as
its session, and a pooled connection would be reset or handed to someone else. When the
connection fails it is re-established with Node's backoff; every (re)connection counts
as a wake-up, since notifications sent while we were away are lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from .._backoff import Backoff
from ._aio import bounded
from .connection import sever

__all__ = ["CHANNELS", "NotificationListener", "insert_count", "reconnect_delay"]

logger = logging.getLogger("sqla_graphile.worker.listener")

#: The channels Node graphile-worker 0.18 listens on.
CHANNELS = ("jobs:insert", "worker:migrate")

# With no notification for this long the connection is checked with a round trip, so a
# silently dead connection (a half-open TCP session) is noticed and replaced.
_HEALTH_CHECK_INTERVAL = 30.0
# Node's reconnection backoff: 50 ms × e^attempt, at most 60 s, jitter in [0.5, 1).
_RECONNECT = Backoff(first=0.05, factor=math.e, cap=60.0)
# Time limit of connecting and of each statement when none is given.
_DEFAULT_TIMEOUT = 30.0


def reconnect_delay(attempt: int, jitter: float | None = None) -> float:
    """Seconds before reconnection ``attempt`` (0-based): Node's backoff.

    ``ceil(jitter × min(60 000, 50 × e^attempt))`` milliseconds, jitter in [0.5, 1).
    """
    draw = None if jitter is None else (jitter - 0.5) * 2
    return math.ceil(_RECONNECT.delay(attempt + 1, draw) * 1000.0) / 1000.0


def insert_count(payload: str) -> int:
    """How many jobs a ``jobs:insert`` payload announces (1 when it does not say)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return 1
    if isinstance(data, dict):
        count = data.get("count", 1)
        if isinstance(count, (int, float)) and not isinstance(count, bool):
            return int(count)
    return 1


class NotificationListener:
    """Keeps a LISTEN session open and reports what arrives.

    ``on_insert(count)`` for a ``jobs:insert`` with a positive count, ``on_migrate(data)``
    for ``worker:migrate``, ``on_connect()`` after each successful LISTEN.
    """

    def __init__(
        self,
        connect_kwargs: Mapping[str, Any],
        *,
        on_insert: Callable[[int], None],
        on_migrate: Callable[[dict[str, Any]], None],
        on_connect: Callable[[], None],
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> None:
        self._connect_kwargs = dict(connect_kwargs)
        self._timeout = timeout
        self._on_insert = on_insert
        self._on_migrate = on_migrate
        self._on_connect = on_connect
        self.listening = False
        """Whether the LISTEN session is established right now."""

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff after any failure."""
        attempt = 0
        while True:
            connection: psycopg.AsyncConnection[Any] | None = None
            try:
                connection = await bounded(
                    psycopg.AsyncConnection.connect(**self._connect_kwargs, autocommit=True),
                    self._timeout,
                )
                listen = sql.SQL("; ").join(
                    sql.SQL("LISTEN {}").format(sql.Identifier(channel)) for channel in CHANNELS
                )
                await self._timed(connection, connection.execute(listen))
                self.listening = True
                attempt = 0
                self._on_connect()
                await self._receive(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = reconnect_delay(attempt)
                attempt += 1
                logger.warning(
                    "LISTEN connection failed (%s); reconnecting in %.3f s", _brief(exc), delay
                )
                self.listening = False
                await _close(connection)
                connection = None
                await asyncio.sleep(delay)
            finally:
                self.listening = False
                await _close(connection)

    async def _receive(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """Dispatch notifications from the socket's reader callback until the link fails.

        The callback hands each notification on as soon as the loop sees the socket
        readable: no task wakes up in between, and nothing is re-armed per notification.
        """
        loop = asyncio.get_running_loop()
        pgconn = connection.pgconn
        fileno = connection.fileno()
        encoding = connection.info.encoding
        dispatch = self._dispatch
        # Notifications that arrive while a health check runs come through psycopg.
        connection.add_notify_handler(lambda notify: dispatch(notify.channel, notify.payload))
        failed: asyncio.Future[None] = loop.create_future()
        received = False

        def drain() -> None:
            nonlocal received
            while (notify := pgconn.notifies()) is not None:
                received = True
                dispatch(notify.relname.decode(encoding), notify.extra.decode(encoding))

        def readable() -> None:
            try:
                pgconn.consume_input()
            except Exception as exc:  # the connection is gone
                loop.remove_reader(fileno)
                if not failed.done():
                    failed.set_exception(exc)
                return
            drain()

        while True:
            drain()  # whatever libpq already holds
            received = False
            timer = loop.call_later(_HEALTH_CHECK_INTERVAL, _resolve, failed)
            loop.add_reader(fileno, readable)
            try:
                await failed
            finally:
                timer.cancel()
                loop.remove_reader(fileno)
            failed.result()  # raises when the connection broke
            failed = loop.create_future()
            if not received:
                await self._timed(connection, connection.execute("select 1"))

    async def _timed(self, connection: psycopg.AsyncConnection[Any], statement: Any) -> None:
        """Await a statement; on a silent link, cut the socket once the time limit passes."""
        timer = asyncio.get_running_loop().call_later(self._timeout, sever, connection.fileno())
        try:
            await statement
        finally:
            timer.cancel()

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == "jobs:insert":
            count = insert_count(payload)
            if count > 0:
                self._on_insert(count)
        elif channel == "worker:migrate":
            try:
                data = json.loads(payload)
            except ValueError:
                data = None
            self._on_migrate(data if isinstance(data, dict) else {})
        else:  # pragma: no cover - we listen to nothing else
            logger.debug("notification on unexpected channel %r", channel)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _close(connection: psycopg.AsyncConnection[Any] | None) -> None:
    if connection is None or connection.closed:
        return
    try:
        await connection.close()
    except Exception:  # closing a broken connection may fail; it is gone either way
        logger.debug("error closing the LISTEN connection", exc_info=True)


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
