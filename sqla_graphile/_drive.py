"""Drive a generator operation (see :mod:`sqla_graphile._ops`) on one connection.

The operation yields ``(statement, parameters)`` and receives each result; these drivers
execute every request on the connection they are given, inside whatever transaction it
holds, and return the operation's value.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection

from ._ops import Op, Request

__all__ = ["drive", "drive_async", "first_request"]

_T = TypeVar("_T")


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
