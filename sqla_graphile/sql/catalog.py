"""Questions about the database itself, and the migrations' bookkeeping.

Whether a schema or a relation exists, the server's version, what Graphile's ledger
holds, the ``worker:migrate`` announcement and the migrators' lock. The revisions under
``migrations/versions`` keep their own SQL: they are frozen history.
"""

from __future__ import annotations

from sqlalchemy import (
    Integer,
    Text,
    bindparam,
    cast,
    column,
    exists,
    func,
    literal,
    select,
    table,
)
from sqlalchemy.schema import DropSchema

from ..schema import WorkerSchema

__all__ = ["MIGRATION_LOCK_NAMESPACE", "CatalogStatements", "qualified_name"]

#: Prefix of the advisory-lock key that serialises concurrent migrators of one schema.
MIGRATION_LOCK_NAMESPACE = "sqla_graphile.migrate:"

_namespaces = table("pg_namespace", column("nspname", Text), schema="pg_catalog")


def qualified_name(schema: WorkerSchema, name: str) -> str:
    """``"schema".name`` as ``to_regclass`` reads it (``name`` needs no quoting)."""
    return f"{schema.quoted_name}.{name}"


class CatalogStatements:
    """The catalog statements for one worker schema.

    ``schema_exists`` takes ``:name``; ``relation`` (``to_regclass``) takes ``:name``, a
    qualified name as :func:`qualified_name` builds it; ``notify_migration`` takes
    ``:payload``.
    """

    def __init__(self, schema: WorkerSchema) -> None:
        self.schema_exists = select(
            exists().where(_namespaces.c.nspname == bindparam("name", type_=Text))
        )
        self.relation = select(func.to_regclass(bindparam("name", type_=Text)))
        self.server_version_num = select(
            cast(func.current_setting(literal("server_version_num", Text)), Integer)
        )
        self.server_version = select(func.current_setting(literal("server_version", Text)))
        ledger = schema.migrations
        self.ledger_summary = select(
            func.max(ledger.c.id),
            func.max(ledger.c.id).filter(ledger.c.breaking.is_(True)),
        )
        self.notify_migration = select(
            func.pg_notify(literal("worker:migrate", Text), bindparam("payload", type_=Text))
        )
        self.migration_lock = select(
            func.pg_advisory_xact_lock(
                func.hashtext(literal(MIGRATION_LOCK_NAMESPACE + schema.name, Text))
            )
        )
        self.drop_schema = DropSchema(schema.name, cascade=True, if_exists=True)
