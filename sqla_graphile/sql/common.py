"""Pieces shared by the statements of several concerns: types, Node's rules, notifications."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Interval,
    Select,
    Table,
    Text,
    cast,
    column,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy.sql.functions import Function

__all__ = [
    "IDEMPOTENT_OPTION",
    "NODE_LOCK_EXPIRY",
    "TIMESTAMPTZ",
    "job_rows",
    "jobs_inserted",
    "lock_expired",
    "seconds",
]

NODE_LOCK_EXPIRY = timedelta(hours=4)
"""Node graphile-worker's hard-coded lock expiry: a lock older than this belongs to a dead
worker. The worker's own sweep applies it to every lock, recovery sweeps to holders that
never registered a heartbeat."""

TIMESTAMPTZ = DateTime(timezone=True)


def lock_expired(locked_at: ColumnElement[Any]) -> ColumnElement[bool]:
    """``locked_at`` is older than :data:`NODE_LOCK_EXPIRY`, by the database's clock."""
    return locked_at < func.now() - literal(NODE_LOCK_EXPIRY, Interval)


def seconds(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """``value`` seconds as an interval (``value`` a number expression)."""
    return value * literal_column("interval '1 second'", Interval)


def jobs_inserted(count: Any) -> Any:
    """Node's ``jobs:insert`` notification for ``count`` new jobs, delivered at commit."""
    message = (
        literal('{"r":', Text)
        + cast(func.random(), Text)
        + literal(',"count":', Text)
        + cast(count, Text)
        + literal("}", Text)
    )
    return func.pg_notify(literal("jobs:insert", Text), message).label("notified")


def job_rows(jobs: Table, call: Function[Any]) -> Select[Any]:
    """``select * from call`` for a worker function returning ``_private_jobs`` rows.

    The result columns carry the table's types, so every driver decodes JSON and
    timestamps the same way.
    """
    alias = call.table_valued(*(column(c.name, c.type) for c in jobs.columns), name="job")
    return select(*alias.c).select_from(alias)


#: The execution option that tags a statement idempotent or not (see ``NOT_IDEMPOTENT``
#: in :mod:`sqla_graphile.sql`).
IDEMPOTENT_OPTION = "sqla_graphile_idempotent"
