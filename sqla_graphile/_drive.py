"""Operations written once, and the drivers that run them on a connection.

An operation (:data:`Op`) is a generator: it yields ``(statement, parameters)`` requests
(statements from :mod:`sqla_graphile.sql`), receives each statement's
:class:`~sqlalchemy.engine.Result`, and returns its value. It never executes anything
itself, so one operation serves every way of executing:

* :func:`drive` on a sync ``Connection`` (``WorkerUtils``, and ``AsyncWorkerUtils``
  inside one ``run_sync`` hop per call);
* :func:`drive_async` on an ``AsyncConnection`` (the worker's recovery agent, the
  dashboard);
* the worker's held psycopg connections (``Database.drive`` in
  :mod:`sqla_graphile.worker.connection`), which run the statements compiled once and
  hand the rows back through :func:`~sqla_graphile._sqlalchemy.result_of_rows`.

Each driver executes every request on the connection it is given, inside whatever
transaction it holds, and returns the operation's value.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, TypeVar

from sqlalchemy import Connection, Executable
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Op", "Request", "drive", "drive_async", "first_request"]

_T = TypeVar("_T")

#: A statement to execute and its parameters.
Request = tuple[Executable, Mapping[Any, Any]]
#: An operation: yields requests, receives their results, returns its value.
Op = Generator[Request, Result[Any], _T]


def first_request(op: Op[_T]) -> tuple[Request | None, _T | None]:
    """Take ``op``'s first request, or its value when it needs no database at all.

    Lets a caller skip opening a connection or transaction for operations answered
    from memory (an empty ``add_jobs``, say).
    """
    try:
        return next(op), None
    except StopIteration as stop:
        return None, stop.value


def drive(connection: Connection, op: Op[_T], request: Request | None = None) -> _T:
    """Run ``op`` to its end on a sync ``connection``; return its value.

    ``request`` is the operation's first request when :func:`first_request` took it.
    """
    try:
        if request is None:
            request = next(op)
        while True:
            result: Result[Any] = connection.execute(request[0], dict(request[1]))
            request = op.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def drive_async(
    connection: AsyncConnection, op: Op[_T], request: Request | None = None
) -> _T:
    """Run ``op`` to its end on an async ``connection``; return its value."""
    try:
        if request is None:
            request = next(op)
        while True:
            result: Result[Any] = await connection.execute(request[0], dict(request[1]))
            request = op.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
