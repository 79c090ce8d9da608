"""Every SQL statement of the library, as SQLAlchemy Core, built once per worker schema.

``statements(schema)`` returns the registry of one schema; its statements are grouped by
concern, each group built on first use:

* :attr:`~Statements.adding` (:mod:`.adding`): adding jobs, registering tasks;
* :attr:`~Statements.admin` (:mod:`.admin`): managing jobs, cleanups, operators' reads;
* :attr:`~Statements.recovery` (:mod:`.recovery`): heartbeats and recovery sweeps;
* :attr:`~Statements.worker` (:mod:`.worker`): the worker's fetches and outcome writes;
* :attr:`~Statements.catalog` (:mod:`.catalog`): the database's catalog, the ledger;
* :attr:`~Statements.cron` (:mod:`.cron`): the cron scheduler's claims and jobs;
* :attr:`~Statements.dashboard` (:mod:`.dashboard`): the dashboard's bounded job list.

:func:`all_statements` lists them all by name. The revisions under
``migrations/versions`` keep the SQL they ran (frozen history).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from sqlalchemy import Executable

from ..functions import worker_functions
from ..schema import WorkerSchema, worker_schema
from .adding import AddingStatements
from .admin import AdminStatements
from .catalog import CatalogStatements
from .common import IDEMPOTENT_OPTION, NODE_LOCK_EXPIRY
from .cron import CronStatements, cron_statements
from .dashboard import DashboardStatements
from .recovery import RecoveryStatements
from .worker import WorkerStatements

__all__ = [
    "IDEMPOTENT_OPTION",
    "NODE_LOCK_EXPIRY",
    "NOT_IDEMPOTENT",
    "AddingStatements",
    "AdminStatements",
    "CatalogStatements",
    "CronStatements",
    "DashboardStatements",
    "RecoveryStatements",
    "Statements",
    "WorkerStatements",
    "all_statements",
    "is_idempotent",
    "statements",
]

_G = TypeVar("_G")

_CONCERNS = ("adding", "admin", "recovery", "worker", "catalog", "cron", "dashboard")

#: The statements that do more when run a second time after the reply to the first was
#: lost: they add another job, lock further jobs, or notify again. Every other statement
#: of the registry is idempotent: a second run changes nothing the first did not. A
#: statement is retried after a failure only when it is idempotent or its caller has a
#: guard that finds out what the first try did (the fetch reclaims what it locked).
NOT_IDEMPOTENT = frozenset(
    {
        "adding.add_job",
        "adding.add_jobs_text",
        "adding.insert_job",
        "adding.insert_jobs",
        "adding.insert_jobs_counted",
        "adding.insert_uniform_jobs",
        "adding.insert_uniform_jobs_counted",
        "adding.insert_queued_job",
        "catalog.notify_migration",
        "worker.fetch",
        "worker.fetch_one",
        "worker.fetch_one_with_flags",
        "worker.fetch_with_flags",
    }
)


def is_idempotent(statement: Any) -> bool | None:
    """A registry statement's tag: whether a second run is harmless (``None``: untagged)."""
    options = getattr(statement, "get_execution_options", None)
    if options is None:
        return None
    tag = options().get(IDEMPOTENT_OPTION)
    return None if tag is None else bool(tag)


def _tagged(concern: str, group: _G) -> _G:
    """``group`` with each of its statements tagged idempotent or not (see above)."""
    for name, value in list(vars(group).items()):
        if isinstance(value, Executable) and not name.startswith("_"):
            tag = f"{concern}.{name}" not in NOT_IDEMPOTENT
            object.__setattr__(group, name, value.execution_options(**{IDEMPOTENT_OPTION: tag}))
    return group


class Statements:
    """The statements of one worker schema, by concern (each group built once)."""

    def __init__(self, schema: WorkerSchema) -> None:
        self.schema = schema

    @functools.cached_property
    def adding(self) -> AddingStatements:
        """Adding jobs and registering tasks."""
        return _tagged("adding", AddingStatements(self.schema, worker_functions(self.schema.name)))

    @functools.cached_property
    def admin(self) -> AdminStatements:
        """Managing jobs, cleanups and the operators' reads."""
        return _tagged("admin", AdminStatements(self.schema, worker_functions(self.schema.name)))

    @functools.cached_property
    def recovery(self) -> RecoveryStatements:
        """The heartbeat registry and recovery sweeps."""
        return _tagged("recovery", RecoveryStatements(self.schema))

    @functools.cached_property
    def worker(self) -> WorkerStatements:
        """The worker's fetches and outcome writes."""
        return _tagged("worker", WorkerStatements(self.schema))

    @functools.cached_property
    def catalog(self) -> CatalogStatements:
        """The catalog, the ledger and the migrators' lock."""
        return _tagged("catalog", CatalogStatements(self.schema))

    @functools.cached_property
    def cron(self) -> CronStatements:
        """The cron scheduler's: known crontab items, and a minute's claims and jobs."""
        return _tagged("cron", cron_statements(self.schema.name))

    @functools.cached_property
    def dashboard(self) -> DashboardStatements:
        """The dashboard's request settings and its keyset-paged job list."""
        return _tagged("dashboard", DashboardStatements(self.schema))


@functools.lru_cache(maxsize=64)
def statements(schema: str) -> Statements:
    """The statements of the worker schema called ``schema`` (cached per name)."""
    return Statements(worker_schema(schema))


def all_statements(schema: str) -> dict[str, Executable]:
    """Every statement of the registry for ``schema``, named ``concern.name``.

    Statements built from parameters (``admin.list_jobs``) are listed in every variant.
    """
    registry = statements(schema)
    found: dict[str, Executable] = {}
    for concern in _CONCERNS:
        group: Any = getattr(registry, concern)
        members = {name: value for name, value in vars(group).items() if not name.startswith("_")}
        variants = getattr(group, "variants", None)
        if variants is not None:
            members.update(variants())
        for name, value in members.items():
            if isinstance(value, Executable):
                found[f"{concern}.{name}"] = value
    return found
