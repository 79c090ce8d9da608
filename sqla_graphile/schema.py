"""The Graphile Worker 0.18 schema as SQLAlchemy Core objects, for any schema name.

``worker_schema("my_schema")`` returns the tables of that schema; the module-level names
(``jobs``, ``private_jobs`` …) are those of the default schema ``graphile_worker``::

    from sqlalchemy import select
    from sqla_graphile.schema import jobs

    select(jobs.c.task_identifier, jobs.c.run_at).where(jobs.c.locked_at.is_(None))

These objects describe the schema for queries; the schema itself is created by the
migrations in :mod:`sqla_graphile.migrations`, never by ``MetaData.create_all``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import UserDefinedType

from .errors import InvalidSchemaName

__all__ = [
    "DEFAULT_SCHEMA",
    "JobSpecType",
    "WorkerSchema",
    "jobs",
    "literal_sql",
    "migrations",
    "private_job_queues",
    "private_jobs",
    "private_known_crontabs",
    "private_tasks",
    "quote_schema",
    "validate_schema_name",
    "worker_registry",
    "worker_schema",
]

DEFAULT_SCHEMA = "graphile_worker"

# PostgreSQL truncates identifiers longer than NAMEDATALEN - 1 bytes; a truncated schema
# name would silently point at a different schema, so it is refused instead.
_MAX_IDENTIFIER_BYTES = 63

# A "named" paramstyle keeps the preparer from doubling "%" signs: quote_schema() returns
# the identifier exactly as PostgreSQL reads it, and each statement escapes it as needed.
_PG_DIALECT = postgresql.dialect(paramstyle="named")  # type: ignore[no-untyped-call]


def validate_schema_name(name: str) -> str:
    """Return ``name`` if PostgreSQL can hold it as a schema name, else raise.

    Any characters are allowed (the name is always quoted); empty names, NUL bytes, lone
    surrogates, the reserved ``pg_`` prefix and names over 63 bytes are refused with
    :class:`~sqla_graphile.errors.InvalidSchemaName`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidSchemaName("the worker schema name must be a non-empty string")
    if "\x00" in name:
        raise InvalidSchemaName("the worker schema name must not contain NUL bytes")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidSchemaName(
            "the worker schema name must be valid Unicode (it holds a lone surrogate)"
        ) from None
    if name.startswith("pg_"):
        raise InvalidSchemaName(
            f"the worker schema name {name[:20]!r} starts with 'pg_', which PostgreSQL "
            "reserves for system schemas"
        )
    if size > _MAX_IDENTIFIER_BYTES:
        raise InvalidSchemaName(
            f"the worker schema name {name[:20]!r}… is longer than PostgreSQL's "
            f"{_MAX_IDENTIFIER_BYTES}-byte identifier limit"
        )
    return name


def quote_schema(name: str) -> str:
    """Return ``name`` quoted as a PostgreSQL identifier by SQLAlchemy's preparer."""
    return str(_PG_DIALECT.identifier_preparer.quote_identifier(validate_schema_name(name)))


def literal_sql(statement: str) -> TextClause:
    """``text(statement)`` for SQL that has no parameters.

    A colon in it (in a quoted schema name, say) is kept as written, never taken for a
    bind parameter.
    """
    return text(statement.replace(":", "\\:"))


class JobSpecType(UserDefinedType[Any]):
    """The composite type ``<schema>.job_spec`` (the element type of ``add_jobs``)."""

    cache_ok = True

    def __init__(self, schema: str = DEFAULT_SCHEMA) -> None:
        self.schema = schema

    def get_col_spec(self, **kw: Any) -> str:
        """Render the schema-qualified, quoted type name."""
        return f"{quote_schema(self.schema)}.job_spec"


@compiles(JobSpecType)
def _compile_job_spec(type_: JobSpecType, compiler: Any, **kw: Any) -> str:
    # Quoted by the compiling dialect's own preparer, so a "%" in the schema name is
    # escaped for drivers whose paramstyle needs it (psycopg, psycopg2).
    preparer = compiler.dialect.identifier_preparer
    return f"{preparer.quote_identifier(validate_schema_name(type_.schema))}.job_spec"


@dataclass(frozen=True)
class WorkerSchema:
    """The tables, the ``jobs`` view and the ``job_spec`` type of one worker schema."""

    name: str
    metadata: MetaData
    private_jobs: Table
    private_job_queues: Table
    private_tasks: Table
    private_known_crontabs: Table
    migrations: Table
    worker_registry: Table
    """sqla-graphile's own heartbeat registry ``_sqla_graphile_workers`` (never in Node's
    ledger; created by the library's second revision)."""
    jobs: Table
    """The public, stable ``jobs`` view (no payload), mapped as a read-only table."""
    job_spec: JobSpecType

    @property
    def quoted_name(self) -> str:
        """The schema name quoted for SQL."""
        return quote_schema(self.name)


def _timestamptz() -> DateTime:
    return DateTime(timezone=True)


@functools.lru_cache(maxsize=64)
def worker_schema(name: str = DEFAULT_SCHEMA) -> WorkerSchema:
    """Return the Core objects of the worker schema called ``name`` (cached per name)."""
    validate_schema_name(name)
    metadata = MetaData(schema=name)
    now = text("now()")

    private_jobs = Table(
        "_private_jobs",
        metadata,
        Column("id", BigInteger, Identity(always=True), nullable=False),
        Column("job_queue_id", Integer, nullable=True),
        Column("task_id", Integer, nullable=False),
        Column("payload", postgresql.JSON, nullable=False, server_default=text("'{}'::json")),
        Column("priority", SmallInteger, nullable=False, server_default=text("0")),
        Column("run_at", _timestamptz(), nullable=False, server_default=now),
        Column("attempts", SmallInteger, nullable=False, server_default=text("0")),
        Column("max_attempts", SmallInteger, nullable=False, server_default=text("25")),
        Column("last_error", Text, nullable=True),
        Column("created_at", _timestamptz(), nullable=False, server_default=now),
        Column("updated_at", _timestamptz(), nullable=False, server_default=now),
        Column("key", Text, nullable=True),
        Column("locked_at", _timestamptz(), nullable=True),
        Column("locked_by", Text, nullable=True),
        Column("revision", Integer, nullable=False, server_default=text("0")),
        Column("flags", postgresql.JSONB, nullable=True),
        Column(
            "is_available",
            Boolean,
            Computed("locked_at IS NULL AND attempts < max_attempts", persisted=True),
            nullable=False,
        ),
        PrimaryKeyConstraint("id", name="jobs_pkey1"),
        UniqueConstraint("key", name="jobs_key_key1"),
        CheckConstraint("length(key) > 0 AND length(key) <= 512", name="jobs_key_check"),
        CheckConstraint("max_attempts >= 1", name="jobs_max_attempts_check"),
    )
    Index(
        "jobs_main_index",
        private_jobs.c.priority,
        private_jobs.c.run_at,
        postgresql_include=["id", "task_id", "job_queue_id"],
        postgresql_where=private_jobs.c.is_available == true(),
    )
    Index(
        "jobs_no_queue_index",
        private_jobs.c.priority,
        private_jobs.c.run_at,
        postgresql_include=["id", "task_id"],
        postgresql_where=(private_jobs.c.is_available == true())
        & private_jobs.c.job_queue_id.is_(None),
    )

    private_job_queues = Table(
        "_private_job_queues",
        metadata,
        Column("id", Integer, Identity(always=True), nullable=False),
        Column("queue_name", Text, nullable=False),
        Column("locked_at", _timestamptz(), nullable=True),
        Column("locked_by", Text, nullable=True),
        Column(
            "is_available", Boolean, Computed("locked_at IS NULL", persisted=True), nullable=False
        ),
        PrimaryKeyConstraint("id", name="job_queues_pkey1"),
        UniqueConstraint("queue_name", name="job_queues_queue_name_key"),
        CheckConstraint("length(queue_name) <= 128", name="job_queues_queue_name_check"),
    )

    private_tasks = Table(
        "_private_tasks",
        metadata,
        Column("id", Integer, Identity(always=True), nullable=False),
        Column("identifier", Text, nullable=False),
        PrimaryKeyConstraint("id", name="tasks_pkey"),
        UniqueConstraint("identifier", name="tasks_identifier_key"),
        CheckConstraint("length(identifier) <= 128", name="tasks_identifier_check"),
    )

    private_known_crontabs = Table(
        "_private_known_crontabs",
        metadata,
        Column("identifier", Text, nullable=False),
        Column("known_since", _timestamptz(), nullable=False),
        Column("last_execution", _timestamptz(), nullable=True),
        PrimaryKeyConstraint("identifier", name="known_crontabs_pkey"),
    )

    migrations_table = Table(
        "migrations",
        metadata,
        # Migration numbers, not a serial: no sequence, no default.
        Column("id", Integer, nullable=False, autoincrement=False),
        Column("ts", _timestamptz(), nullable=False, server_default=now),
        Column("breaking", Boolean, nullable=False, server_default=text("false")),
        PrimaryKeyConstraint("id", name="migrations_pkey"),
    )

    # Ours, not Node's: one row per worker with crash recovery enabled, heartbeated.
    worker_registry = Table(
        "_sqla_graphile_workers",
        metadata,
        Column("worker_id", Text, nullable=False),
        Column("started_at", _timestamptz(), nullable=False, server_default=now),
        Column("last_heartbeat_at", _timestamptz(), nullable=False, server_default=now),
        Column("metadata", postgresql.JSONB, nullable=True),
        PrimaryKeyConstraint("worker_id", name="_sqla_graphile_workers_pkey"),
    )
    Index("_sqla_graphile_workers_heartbeat_idx", worker_registry.c.last_heartbeat_at)

    # The view lives in its own MetaData so that nothing ever tries to CREATE TABLE it.
    view_metadata = MetaData(schema=name)
    jobs_view = Table(
        "jobs",
        view_metadata,
        Column("id", BigInteger, primary_key=True),
        Column("queue_name", Text),
        Column("task_identifier", Text),
        Column("priority", SmallInteger),
        Column("run_at", _timestamptz()),
        Column("attempts", SmallInteger),
        Column("max_attempts", SmallInteger),
        Column("last_error", Text),
        Column("created_at", _timestamptz()),
        Column("updated_at", _timestamptz()),
        Column("key", Text),
        Column("locked_at", _timestamptz()),
        Column("locked_by", Text),
        Column("revision", Integer),
        Column("flags", postgresql.JSONB),
        info={"is_view": True},
    )

    return WorkerSchema(
        name=name,
        metadata=metadata,
        private_jobs=private_jobs,
        private_job_queues=private_job_queues,
        private_tasks=private_tasks,
        private_known_crontabs=private_known_crontabs,
        migrations=migrations_table,
        worker_registry=worker_registry,
        jobs=jobs_view,
        job_spec=JobSpecType(name),
    )


_default = worker_schema()

#: ``graphile_worker._private_jobs``
private_jobs = _default.private_jobs
#: ``graphile_worker._private_job_queues``
private_job_queues = _default.private_job_queues
#: ``graphile_worker._private_tasks``
private_tasks = _default.private_tasks
#: ``graphile_worker._private_known_crontabs``
private_known_crontabs = _default.private_known_crontabs
#: ``graphile_worker.migrations`` — Graphile Worker's own migration ledger
migrations = _default.migrations
#: ``graphile_worker._sqla_graphile_workers`` — the worker heartbeat registry (ours)
worker_registry = _default.worker_registry
#: ``graphile_worker.jobs`` — the public view
jobs = _default.jobs
