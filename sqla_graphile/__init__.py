"""sqla-graphile: Graphile Worker's PostgreSQL job queue for SQLAlchemy applications."""

from __future__ import annotations

from ._version import __version__
from .errors import (
    DatabaseNewerThanLibrary,
    GraphileWorkerError,
    InvalidJobKeyMode,
    InvalidSchemaName,
    MigrationError,
    NotSchemaOwner,
    SchemaNotMigrated,
)
from .migrations import migrate
from .schema import DEFAULT_SCHEMA, WorkerSchema, worker_schema

__all__ = [
    "DEFAULT_SCHEMA",
    "DatabaseNewerThanLibrary",
    "GraphileWorkerError",
    "InvalidJobKeyMode",
    "InvalidSchemaName",
    "MigrationError",
    "NotSchemaOwner",
    "SchemaNotMigrated",
    "WorkerSchema",
    "__version__",
    "migrate",
    "worker_schema",
]
