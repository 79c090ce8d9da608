"""Every use of SQLAlchemy internals, in one place.

The worker runs its statements on psycopg directly (compiled once by SQLAlchemy) and
reads a few settings SQLAlchemy keeps to itself. Each such access is wrapped here, so an
upgrade of SQLAlchemy that changes one of them breaks this module alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Dialect
from sqlalchemy.engine import IteratorResult, Result
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.pool import Pool

__all__ = [
    "bind_processors",
    "json_deserializer",
    "literal_parameters",
    "pool_max_overflow",
    "result_of_rows",
]


def literal_parameters(compiled: Any) -> dict[str, Any]:
    """The parameters a compiled statement holds values for (its literals, bound).

    Parameters without a value come as ``None``; the statement's own bind parameters
    are not checked for values (they are given at execution).
    """
    return dict(compiled.construct_params(_check=False))


def bind_processors(compiled: Any) -> dict[str, Callable[[Any], Any]]:
    """The bind-value processors of a compiled statement's parameters, by name."""
    processors: Mapping[str, Callable[[Any], Any] | None] = compiled._bind_processors
    return {key: process for key, process in processors.items() if process is not None}


def pool_max_overflow(pool: Pool, default: int = 0) -> int:
    """A ``QueuePool``'s ``max_overflow`` (not exposed publicly); ``default`` elsewhere."""
    return int(getattr(pool, "_max_overflow", default))


def json_deserializer(dialect: Dialect) -> Callable[[str], Any] | None:
    """The ``json_deserializer`` an engine was created with (``None``: the default)."""
    loads: Callable[[str], Any] | None = getattr(dialect, "_json_deserializer", None)
    return loads


def result_of_rows(names: tuple[str, ...], rows: Iterable[Sequence[Any]]) -> Result[Any]:
    """A SQLAlchemy ``Result`` over rows fetched outside SQLAlchemy (``names``: columns).

    Lets an operation written for ``Connection.execute`` read the rows of a statement
    the worker ran on psycopg directly.
    """
    return IteratorResult(_metadata(names), iter(rows))


@functools.lru_cache(maxsize=256)
def _metadata(names: tuple[str, ...]) -> SimpleResultMetaData:
    # Built once per set of columns and shared, as SQLAlchemy shares a cached statement's.
    return SimpleResultMetaData(names)
