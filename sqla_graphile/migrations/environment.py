"""The body of the standalone Alembic ``env.py`` (packaged and repository environments)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.schema import CreateSchema

from .._urls import engine_from_url
from ..errors import InvalidArgument
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..sql import statements
from . import _SCHEMA_OPTION, VERSION_TABLE, check_database, include_name


def _schema_from_context() -> str:
    from alembic import context

    name = (
        context.config.attributes.get(_SCHEMA_OPTION)
        or context.get_x_argument(as_dictionary=True).get(_SCHEMA_OPTION)
        or os.environ.get("GRAPHILE_WORKER_SCHEMA")
        or DEFAULT_SCHEMA
    )
    return validate_schema_name(str(name))


def _options(schema: str) -> dict[str, Any]:
    return {
        "version_table": VERSION_TABLE,
        "version_table_schema": schema,
        _SCHEMA_OPTION: schema,
        "include_name": include_name(schema),
    }


def lock_and_prepare(connection: Connection, schema: str) -> None:
    """Serialise migrators of ``schema`` and make sure the schema exists.

    The advisory lock is transaction-scoped: it is released when the migration commits,
    and a waiting migrator then finds the work done. The schema is created only when it
    is missing, so a role that may not create schemas can migrate a pre-created one.
    """
    sql = statements(schema).catalog
    connection.execute(sql.migration_lock)
    exists = connection.scalar(sql.schema_exists, {"name": schema})
    if not exists:
        connection.execute(CreateSchema(schema, if_not_exists=True))


def _run_online(connection: Connection, schema: str) -> None:
    from alembic import context

    context.configure(connection=connection, **_options(schema))
    with context.begin_transaction():
        lock_and_prepare(connection, schema)
        # Checked on every run, not only by the baseline revision: a schema this library
        # already stamped may since have been migrated further by a newer Node.
        check_database(connection, schema)
        context.run_migrations()


def run_standalone() -> None:
    """Run the worker revisions.

    They run on the connection handed over in ``config.attributes``, else on
    ``sqlalchemy.url`` / ``DATABASE_URL``; offline (``--sql``) they are emitted as a script.
    """
    from alembic import context

    schema = _schema_from_context()
    config = context.config
    if context.is_offline_mode():
        url = config.get_main_option("sqlalchemy.url") or "postgresql://"
        # A "named" paramstyle leaves "%" signs alone in the emitted script.
        context.configure(
            url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(schema)
        )
        with context.begin_transaction():
            # The script must create the schema before the version table inside it.
            context.execute(CreateSchema(schema, if_not_exists=True))
            context.run_migrations()
        return

    connection = config.attributes.get("connection")
    if connection is not None:
        _run_online(connection, schema)
        return
    database_url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not database_url:
        raise InvalidArgument("set DATABASE_URL (or sqlalchemy.url) to run the worker migrations")
    engine = engine_from_url(database_url)
    try:
        with engine.connect() as connection:
            _run_online(connection, schema)
    finally:
        engine.dispose()
