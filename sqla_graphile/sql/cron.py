"""Cron's SQL: the statements the scheduler runs, built with SQLAlchemy Core.

Each statement is defined here once, and built once per worker schema.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    Text,
    bindparam,
    cast,
    column,
    func,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Executable

from ..functions import worker_functions
from ..schema import worker_schema


@dataclass(frozen=True)
class CronStatements:
    """The cron statements of one worker schema."""

    read_known: Executable
    """Every row of ``_private_known_crontabs``: ``identifier, known_since, last_execution``."""
    register_unknown: Executable
    """Record ``:identifiers`` as known since ``:known_since`` (those already known stay)."""
    schedule: Executable
    """Claim minute ``:ts`` for each item of ``:specs`` (a JSON array) not yet scheduled
    for it, and add its job: one row ``identifier, job_id`` per claimed item, in order."""


_TIMESTAMPTZ = DateTime(timezone=True)


@functools.lru_cache(maxsize=64)
def cron_statements(schema: str) -> CronStatements:
    """The cron statements of the worker schema called ``schema`` (built once)."""
    tables = worker_schema(schema)
    fn = worker_functions(schema)
    known = tables.private_known_crontabs
    ts = bindparam("ts", type_=_TIMESTAMPTZ)

    read_known = select(known.c.identifier, known.c.known_since, known.c.last_execution)
    register_unknown = (
        pg_insert(known)
        .from_select(
            ["identifier", "known_since"],
            select(
                func.unnest(bindparam("identifiers", type_=postgresql.ARRAY(Text))),
                bindparam("known_since", type_=_TIMESTAMPTZ),
            ),
        )
        .on_conflict_do_nothing(index_elements=[known.c.identifier])
    )

    # The minute's items, in order: one JSON array in, one row per item.
    entries = (
        func.json_to_recordset(cast(bindparam("specs", type_=Text), postgresql.JSON))
        .table_valued(
            column("ordinal", Integer),
            column("identifier", Text),
            column("task", Text),
            column("payload", postgresql.JSON),
            column("queue_name", Text),
            column("max_attempts", Integer),
            column("job_key", Text),
            column("priority", Integer),
            column("job_key_mode", Text),
        )
        .render_derived(name="entries", with_types=True)
    )
    specs = select(*entries.c).cte("specs")
    upsert = pg_insert(known).from_select(
        ["identifier", "known_since", "last_execution"], select(specs.c.identifier, ts, ts)
    )
    # Claim the minute: a row is written only where this minute was not handled yet; a
    # concurrent process waits on the row, then finds last_execution = ts and skips.
    claimed = (
        upsert.on_conflict_do_update(
            index_elements=[known.c.identifier],
            set_={"last_execution": upsert.excluded.last_execution},
            where=or_(
                known.c.last_execution.is_(None),
                known.c.last_execution < upsert.excluded.last_execution,
            ),
        )
        .returning(known.c.identifier)
        .cte("claimed")
    )
    job_id = fn.add_job(
        specs.c.task,
        specs.c.payload,
        queue_name=specs.c.queue_name,
        run_at=ts,
        max_attempts=specs.c.max_attempts,
        job_key=specs.c.job_key,
        priority=specs.c.priority,
        flags=None,
        job_key_mode=specs.c.job_key_mode,
    ).scalar_table_valued("id", BigInteger)
    # add_job is volatile, so PostgreSQL calls it after the sort: in item order.
    schedule = (
        select(specs.c.identifier, job_id.label("job_id"))
        .select_from(specs.join(claimed, claimed.c.identifier == specs.c.identifier))
        .order_by(specs.c.ordinal)
    )
    return CronStatements(read_known, register_unknown, schedule)
