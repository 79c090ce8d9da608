"""The worker schema's migrations, as an Alembic script directory shipped in the package.

Two ways to run them:

* **Standalone** — :func:`migrate` (also ``WorkerUtils.migrate()`` and
  ``graphile-worker migrate``) runs the revisions with their own Alembic version table
  *inside the worker schema*, so it never meets the application's ``alembic_version``.
* **Integrated** — add ``sqla_graphile:migrations/versions`` to the application's
  ``version_locations`` and pass :func:`alembic_options` to ``context.configure()`` in its
  ``env.py``; ``alembic upgrade heads`` then creates the worker schema beside the
  application's tables, and autogenerate leaves the worker schema alone.

Either way the revisions keep Graphile Worker's own ledger (``<schema>.migrations``)
exactly as Node graphile-worker 0.18 does, rows 1–20, so Node and Python share the schema.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .._urls import engine_from_url
from ..errors import (
    DatabaseNewerThanLibrary,
    LedgerTooOld,
    MigrationError,
    UnsupportedPostgresVersion,
    UsageError,
    sqlstate_of,
)
from ..schema import DEFAULT_SCHEMA, validate_schema_name, worker_schema
from ..sql import statements
from ..sql.catalog import qualified_name

__all__ = [
    "BRANCH_LABEL",
    "BREAKING_MIGRATIONS",
    "HIGHEST_KNOWN_MIGRATION",
    "SCRIPT_LOCATION",
    "VERSION_LOCATION",
    "VERSION_TABLE",
    "Ledger",
    "NewerDatabaseWarning",
    "alembic_config",
    "alembic_options",
    "check_database",
    "current_schema",
    "include_name",
    "migrate",
    "migration_lock",
    "notify_migration",
    "read_ledger",
    "run_migrations",
]

logger = logging.getLogger("sqla_graphile.migrations")

#: Alembic branch label of the worker schema's revisions.
BRANCH_LABEL = "graphile_worker"
#: The packaged Alembic script directory (``env.py`` and ``versions/``).
SCRIPT_LOCATION = "sqla_graphile:migrations"
#: The packaged revisions, for an application's ``version_locations``.
VERSION_LOCATION = "sqla_graphile:migrations/versions"
#: Name of the standalone Alembic version table, kept inside the worker schema.
VERSION_TABLE = "alembic_version"
#: Highest Graphile Worker migration this library creates (Node graphile-worker 0.18).
HIGHEST_KNOWN_MIGRATION = 20
#: Graphile Worker's breaking migrations among 1..20.
BREAKING_MIGRATIONS = frozenset({1, 3, 11, 13, 14, 16, 19})
#: The oldest ledger the baseline revision can bring to 20 by itself.
OLDEST_ADOPTABLE = 18

_SCHEMA_OPTION = "graphile_worker_schema"
_MIN_SERVER_VERSION = 120000


class NewerDatabaseWarning(UserWarning):
    """The worker schema has non-breaking migrations newer than this library knows."""


@dataclass(frozen=True)
class Ledger:
    """What Graphile Worker's ``<schema>.migrations`` table says."""

    schema_exists: bool
    table_exists: bool
    highest: int | None
    highest_breaking: int | None


def read_ledger(connection: Connection, schema: str) -> Ledger:
    """Read Graphile Worker's migration ledger of ``schema`` (it may not exist)."""
    sql = statements(schema).catalog
    schema_exists = bool(connection.scalar(sql.schema_exists, {"name": schema}))
    ws = worker_schema(schema)
    table_exists = (
        schema_exists
        and connection.scalar(sql.relation, {"name": qualified_name(ws, ws.migrations.name)})
        is not None
    )
    if not table_exists:
        return Ledger(schema_exists, False, None, None)
    highest, highest_breaking = connection.execute(sql.ledger_summary).one()
    return Ledger(True, True, highest, highest_breaking)


def check_server_version(connection: Connection) -> None:
    """Refuse PostgreSQL older than 12, as Graphile Worker 0.18 does."""
    # Catalog statements that name no schema are alike in every schema's registry.
    sql = statements(DEFAULT_SCHEMA).catalog
    version = int(connection.execute(sql.server_version_num).scalar_one())
    if version < _MIN_SERVER_VERSION:
        raise UnsupportedPostgresVersion(
            f"PostgreSQL {version // 10000} is not supported: Graphile Worker needs 12 or newer"
        )


def check_database(connection: Connection, schema: str) -> Ledger:
    """Check that this library may use (or migrate) the worker schema of this database.

    Raises :class:`UnsupportedPostgresVersion` below PostgreSQL 12,
    :class:`DatabaseNewerThanLibrary` when the ledger holds a breaking migration above 20,
    and :class:`LedgerTooOld` when a ledger exists but stops before migration 18; warns
    with :class:`NewerDatabaseWarning` on a newer non-breaking migration.
    """
    check_server_version(connection)
    ledger = read_ledger(connection, schema)
    if ledger.highest_breaking is not None and ledger.highest_breaking > HIGHEST_KNOWN_MIGRATION:
        raise DatabaseNewerThanLibrary(schema, ledger.highest_breaking, HIGHEST_KNOWN_MIGRATION)
    if ledger.highest is not None and ledger.highest > HIGHEST_KNOWN_MIGRATION:
        message = (
            f"the worker schema {schema!r} has migration {ledger.highest}, newer than the "
            f"{HIGHEST_KNOWN_MIGRATION} this library knows (not breaking, so continuing)"
        )
        logger.warning(message)
        warnings.warn(message, NewerDatabaseWarning, stacklevel=3)
    if ledger.highest is not None and ledger.highest < OLDEST_ADOPTABLE:
        raise LedgerTooOld(schema, ledger.highest)
    return ledger


def notify_migration(connection: Connection, number: int) -> None:
    """Announce a migration on ``worker:migrate`` exactly as Node graphile-worker does."""
    breaking = "true" if number in BREAKING_MIGRATIONS else "false"
    payload = f'{{"migrationNumber":{number},"breaking":{breaking}}}'
    connection.execute(statements(DEFAULT_SCHEMA).catalog.notify_migration, {"payload": payload})


def current_schema() -> str:
    """The worker schema name for the revision being run (for use inside revisions).

    Taken from the ``graphile_worker_schema`` option given to ``context.configure()``
    (see :func:`alembic_options`), else from ``-x graphile_worker_schema=…``, else from the
    ``GRAPHILE_WORKER_SCHEMA`` environment variable, else ``graphile_worker``.
    """
    from alembic import context, op

    opts = op.get_context().opts
    name = opts.get(_SCHEMA_OPTION)
    if not name:
        name = context.get_x_argument(as_dictionary=True).get(_SCHEMA_OPTION)
    if not name:
        name = os.environ.get("GRAPHILE_WORKER_SCHEMA") or DEFAULT_SCHEMA
    return validate_schema_name(str(name))


def include_name(
    schema: str = DEFAULT_SCHEMA,
    *,
    also: Callable[[str | None, str, Any], bool] | None = None,
) -> Callable[[str | None, str, Any], bool]:
    """Return an ``include_name`` hook that hides the worker schema from autogenerate.

    ``also`` is the application's own ``include_name`` hook, if it has one; it is asked
    about everything outside the worker schema.
    """

    def hook(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "schema" and name == schema:
            return False
        if parent_names and parent_names.get("schema_name") == schema:
            return False
        return also(name, type_, parent_names) if also is not None else True

    return hook


def alembic_options(schema: str = DEFAULT_SCHEMA, **kw: Any) -> dict[str, Any]:
    """Keyword arguments for ``context.configure()`` in an application's ``env.py``.

    They tell the worker revisions which schema to use and keep autogenerate
    (``alembic revision --autogenerate``, ``alembic check``) from proposing to drop or
    recreate worker objects. Pass the application's own ``include_name`` as a keyword to
    have it chained::

        context.configure(connection=connection, target_metadata=metadata,
                          **alembic_options("graphile_worker"))
    """
    validate_schema_name(schema)
    return {
        _SCHEMA_OPTION: schema,
        "include_name": include_name(schema, also=kw.pop("include_name", None)),
        **kw,
    }


def alembic_config(schema: str = DEFAULT_SCHEMA) -> Any:
    """An in-memory Alembic :class:`~alembic.config.Config` for standalone migrations."""
    from alembic.config import Config

    config = Config()
    # Space-separated: the "package:path" locations hold a colon, the "os" separator here.
    config.set_main_option("path_separator", "space")
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("version_locations", VERSION_LOCATION)
    config.attributes[_SCHEMA_OPTION] = validate_schema_name(schema)
    return config


@contextmanager
def _connect(bind: Engine | Connection | str) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    engine = engine_from_url(bind) if isinstance(bind, str) else bind
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        if isinstance(bind, str):
            engine.dispose()


class _MigrationLock:
    """One migration at a time in this process.

    Alembic's ``context`` and ``op`` are process-wide proxies: two migrations running at
    once in two threads (or two tasks of one event loop) would swap each other's
    environment mid-run. Processes are serialised by an advisory lock in the database
    (see :func:`~sqla_graphile.migrations.environment.lock_and_prepare`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock, waiting for another thread's migration to end."""
        if self._owner == threading.get_ident():
            # Waiting would never end: the migration holding it runs in this very thread
            # (a revision or env.py calling migrate(), or a sync call on a loop migrating).
            raise UsageError(
                "migrate() was called while a migration runs in the same thread; "
                "await it (AsyncWorkerUtils.migrate) or call migrate() outside of it"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    @asynccontextmanager
    async def held_async(self) -> AsyncIterator[None]:
        """Hold the lock without blocking the event loop while another migration runs."""
        # Polled, not awaited in a thread: a cancelled wait must never leave it taken.
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(0.02)
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()


#: Serialises the migrations of this process (see :class:`_MigrationLock`).
migration_lock = _MigrationLock()


def migrate(bind: Engine | Connection | str, schema: str = DEFAULT_SCHEMA) -> None:
    """Bring the worker schema to Node graphile-worker 0.18's (migration 20), standalone.

    ``bind`` is an :class:`~sqlalchemy.Engine`, a database URL, or a
    :class:`~sqlalchemy.Connection` (whose transaction is joined and left to the caller).
    Concurrent callers are serialised, threads of one process by a lock and processes by
    an advisory lock in the database; running it again is a no-op.
    """
    validate_schema_name(schema)
    with migration_lock.held():
        run_migrations(bind, schema)


def run_migrations(bind: Engine | Connection | str, schema: str) -> None:
    """:func:`migrate` for a caller that holds :data:`migration_lock`."""
    from alembic import command

    config = alembic_config(schema)
    with _connect(bind) as connection:
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "heads")
        except DBAPIError as exc:
            if sqlstate_of(exc) == "42501":
                raise MigrationError(
                    f"permission denied while migrating the worker schema {schema!r}: "
                    "migrate as a role that may create it (or owns it)"
                ) from exc
            raise
