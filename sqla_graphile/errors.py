"""Named exceptions, the translation of database errors into them, and error classification.

Every error this library raises on purpose derives from :class:`GraphileWorkerError`;
errors that come from the database keep the driver's exception as ``__cause__``. The
hierarchy:

    GraphileWorkerError
    ├── UsageError                    the library was called the wrong way
    │   ├── InvalidArgument           (also ValueError) an argument's value is unusable
    │   │   └── InvalidSchemaName
    │   ├── InvalidArgumentType       (also TypeError) an argument of the wrong kind
    │   ├── InvalidHookResult         (also TypeError) a hook returned something unusable
    │   ├── EventLoopAlreadyRunning   (also RuntimeError) a blocking call inside a loop
    │   └── WorkerAlreadyRunning      (also RuntimeError) a second run of one worker
    ├── InvalidJobSpec                (also ValueError) a job's fields break a rule
    │   ├── InvalidJobKeyMode, InvalidJobKey, InvalidMaxAttempts, InvalidCharacter
    │   ├── TaskIdentifierTooLong, QueueNameTooLong, DuplicateJobKeyInBatch
    │   ├── ValueOutOfRange           a number or time outside its column's range
    │   └── PayloadNotSerializable    (also TypeError)
    ├── CrontabError                  (also ValueError) a crontab line or Cron item
    ├── JobScheduleSkipped            a before_job_schedule hook skipped the job
    ├── JobScheduleFailed             a before_job_schedule hook refused the job
    ├── JobKeyLocked                  a keyed add lost every race with workers
    ├── JobTimedOut                   a job ran past its time limit (the worker failed it)
    ├── BatchJobError                 a batch job cannot be run as a batch
    ├── NotSchemaOwner                the role may not use the worker schema
    └── MigrationError                the worker schema cannot be used or migrated
        ├── SchemaNotMigrated, DatabaseNewerThanLibrary, LedgerTooOld
        └── UnsupportedPostgresVersion

:func:`is_transient` is the one place that decides whether another try of a failed
statement may succeed; :func:`translate_db_error` names database errors.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = [
    "BatchJobError",
    "CrontabError",
    "DatabaseNewerThanLibrary",
    "DuplicateJobKeyInBatch",
    "EventLoopAlreadyRunning",
    "GraphileWorkerError",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidCharacter",
    "InvalidHookResult",
    "InvalidJobKey",
    "InvalidJobKeyMode",
    "InvalidJobSpec",
    "InvalidMaxAttempts",
    "InvalidSchemaName",
    "JobKeyLocked",
    "JobScheduleFailed",
    "JobScheduleSkipped",
    "JobTimedOut",
    "LedgerTooOld",
    "MigrationError",
    "NotSchemaOwner",
    "PayloadNotSerializable",
    "QueueNameTooLong",
    "SchemaNotMigrated",
    "TaskIdentifierTooLong",
    "UnsupportedPostgresVersion",
    "UsageError",
    "ValueOutOfRange",
    "WorkerAlreadyRunning",
    "is_transient",
    "sqlstate_of",
    "translate_db_error",
]


class GraphileWorkerError(Exception):
    """Base class of every error raised by sqla-graphile."""


# -- misuse ---------------------------------------------------------------------------


class UsageError(GraphileWorkerError):
    """The library was called in a way it does not support; the message says how to call it.

    Each subclass also derives from the built-in exception Python code would expect
    (``ValueError``, ``TypeError``, ``RuntimeError``).
    """


class InvalidArgument(UsageError, ValueError):
    """An argument has the right type but a value the call cannot use."""


class InvalidArgumentType(UsageError, TypeError):
    """An argument is of the wrong kind, e.g. a task identifier where a task is expected."""


class InvalidHookResult(UsageError, TypeError):
    """A hook returned something the library cannot use (nothing was written)."""


class EventLoopAlreadyRunning(UsageError, RuntimeError):
    """A blocking call was made inside a running event loop; use its ``…_async`` twin."""


class WorkerAlreadyRunning(UsageError, RuntimeError):
    """A worker was started again while it runs; each ``Worker`` runs once at a time."""


class InvalidSchemaName(InvalidArgument):
    """The worker schema name cannot be a PostgreSQL schema name."""


# -- the worker schema ------------------------------------------------------------------


class MigrationError(GraphileWorkerError):
    """The worker schema cannot be migrated as asked."""


class SchemaNotMigrated(MigrationError):
    """The worker schema, or an object in it, does not exist (yet) in this database."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        super().__init__(
            f"schema not migrated: the worker schema {schema!r} is missing from this "
            "database, or lacks some of its objects; run `graphile-worker migrate` or "
            "`alembic upgrade heads` first"
        )


class DatabaseNewerThanLibrary(MigrationError):
    """The database holds a breaking migration this library does not know."""

    def __init__(self, schema: str, breaking_id: int, known: int) -> None:
        self.schema = schema
        self.breaking_id = breaking_id
        self.known = known
        super().__init__(
            f"the database's worker schema {schema!r} has breaking migration {breaking_id}, "
            f"newer than the {known} this version of sqla-graphile knows; it is unsafe to "
            "continue: upgrade sqla-graphile"
        )


class LedgerTooOld(MigrationError):
    """The worker schema was migrated by a Graphile Worker older than 0.17."""

    def __init__(self, schema: str, ledger: int) -> None:
        self.schema = schema
        self.ledger = ledger
        super().__init__(
            f"the worker schema {schema!r} was migrated by an old Graphile Worker (its "
            f"ledger stops at migration {ledger}; this library adopts 18 or later). Run "
            "Node graphile-worker 0.18 once on this database (`npx graphile-worker@0.18.0 "
            "--schema-only`), then migrate again"
        )


class UnsupportedPostgresVersion(MigrationError):
    """PostgreSQL is older than 12, which Graphile Worker 0.18 requires."""


class NotSchemaOwner(GraphileWorkerError):
    """The connected role cannot use the worker schema (not its owner).

    The worker tables have row-level security enabled with no policies, so only their
    owner (or a superuser / BYPASSRLS role) can see and change jobs.
    """


# -- jobs -----------------------------------------------------------------------------


class InvalidJobSpec(GraphileWorkerError, ValueError):
    """A job's fields (a ``JobSpec``, ``RescheduleJobOptions``…) break one of the schema's rules.

    Raised before anything is sent when the library can tell (types, ranges, time
    zones), else translated from the database's refusal; either way nothing is written.
    """


class InvalidJobKeyMode(InvalidJobSpec):
    """``job_key_mode`` is not one of replace, preserve_run_at, unsafe_dedupe."""


class TaskIdentifierTooLong(InvalidJobSpec):
    """A task identifier is longer than 128 characters."""


class QueueNameTooLong(InvalidJobSpec):
    """A queue name is longer than 128 characters."""


class InvalidJobKey(InvalidJobSpec):
    """A job key is empty or longer than 512 characters."""


class InvalidCharacter(InvalidJobSpec):
    """A text value holds a character PostgreSQL cannot store: NUL or a lone surrogate."""


class InvalidMaxAttempts(InvalidJobSpec):
    """``max_attempts`` is below 1."""


class ValueOutOfRange(InvalidJobSpec):
    """A value does not fit its column.

    ``priority``, ``attempts`` and ``max_attempts`` are ``smallint`` (-32768..32767); a
    ``run_at`` must lie between the years 1 and 9999 in UTC, a day away from either end,
    so that it reads back as a Python ``datetime`` in any session time zone.
    """


class DuplicateJobKeyInBatch(InvalidJobSpec):
    """Two jobs of one ``add_jobs`` call share a job key."""


class PayloadNotSerializable(InvalidJobSpec, TypeError):
    """A payload cannot be encoded as JSON."""


class JobScheduleSkipped(GraphileWorkerError):
    """A ``before_job_schedule`` hook chose to skip the job; nothing was written."""


class JobScheduleFailed(GraphileWorkerError):
    """A ``before_job_schedule`` hook failed the job; nothing was written."""


class JobTimedOut(GraphileWorkerError):
    """A job ran past its time limit; the worker failed it with this error.

    The limit is the task's ``timeout``, else the worker's ``job_timeout``; ``timeout``
    holds it in seconds. Observers see this as ``JobFailEvent.exception`` and
    ``AfterJobRunContext.error``.
    """

    def __init__(self, message: str, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


class JobKeyLocked(GraphileWorkerError):
    """A keyed add found its job locked by a worker in every one of its attempts.

    Node's ``add_job`` writes nothing when a worker locks the keyed job between its two
    steps (Node issue #580); the library tries again a few times, then raises this.
    Nothing was written: adding again later is safe. ``keys`` holds the job keys.
    """

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class BatchJobError(GraphileWorkerError):
    """A batch job could not be run as a batch, or its handler's answer is unusable."""


class CrontabError(GraphileWorkerError, ValueError):
    """A crontab line or a :class:`~sqla_graphile.cron.Cron` item is invalid.

    ``line`` is the 1-based line number (``None`` for a Python ``Cron`` item) and
    ``field`` the part at fault (``"minute"``, ``"hour"``, ``"day of month"``, ``"month"``,
    ``"day of week"``, ``"task"``, an option name such as ``"fill"``, ``"payload"`` …).
    """

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.line = line
        self.field = field


# -- classifying driver errors ----------------------------------------------------------

#: SQLSTATEs worth another try besides the connection class ``08``: serialisation
#: failure, deadlock, too many connections, and the server shutting down, crashed,
#: starting up, or ending an idle session.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "53300", "57P01", "57P02", "57P03", "57P05"})

#: Operating-system errors of a network link (those not already a ConnectionError).
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ETIMEDOUT",
        "ECONNABORTED",
        "ECONNRESET",
        "ECONNREFUSED",
        "EPIPE",
    )
    if hasattr(errno, name)
)

#: DB-API exception classes that, without a SQLSTATE, mean the link failed.
_LINK_ERROR_CLASSES = frozenset({"OperationalError", "InterfaceError"})


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a driver (or SQLAlchemy-wrapped) error, whatever the driver."""
    candidates: list[Any] = [exc, getattr(exc, "orig", None)]
    candidates.append(getattr(candidates[-1], "__cause__", None))
    for candidate in candidates:
        if candidate is None:
            continue
        for attribute in ("sqlstate", "pgcode"):
            value = getattr(candidate, attribute, None)
            if isinstance(value, str) and value:
                return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether another try of the failed statement, on a fresh connection, may succeed.

    Yes for a lost or refused link (connection-class SQLSTATEs ``08…``, a DB-API
    ``OperationalError``/``InterfaceError`` without a SQLSTATE, ``ConnectionError``,
    ``TimeoutError``, a network ``OSError``, a pool timeout), a server shutting down
    or starting up (``57P01``-``57P03``, ``57P05``), too many connections (``53300``), a
    serialisation failure or deadlock (``40001``, ``40P01``). No for everything else:
    a statement the server refused for what it says (a missing schema, a constraint),
    other operating-system errors (a missing file), and programming errors
    (``TypeError``, ``ValueError``) whatever they wrap.
    """
    if isinstance(exc, (TypeError, ValueError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, PoolTimeoutError)):
        return True
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN  # a name server that did not answer
    if isinstance(exc, OSError):
        return exc.errno in _NETWORK_ERRNOS
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state.startswith("08") or state in _TRANSIENT_SQLSTATES
    driver_error = exc.orig if isinstance(exc, DBAPIError) else exc
    if driver_error is None:
        return False
    # No SQLSTATE: the server never answered; the DB-API class says whether the link broke.
    return any(cls.__name__ in _LINK_ERROR_CLASSES for cls in type(driver_error).__mro__)


# -- naming database errors -------------------------------------------------------------

_CONSTRAINT_ERRORS: dict[str, tuple[type[InvalidJobSpec], str]] = {
    "tasks_identifier_check": (
        TaskIdentifierTooLong,
        "task identifiers are at most 128 characters",
    ),
    "job_queues_queue_name_check": (QueueNameTooLong, "queue names are at most 128 characters"),
    "jobs_key_check": (InvalidJobKey, "job keys are 1 to 512 characters"),
    "jobs_max_attempts_check": (InvalidMaxAttempts, "max_attempts must be at least 1"),
}

_CONSTRAINT_IN_MESSAGE = re.compile(r'constraint "([^"]+)"')

#: Undefined schema, table (or view), function and type: a missing worker object.
_MISSING_OBJECT_SQLSTATES = frozenset({"3F000", "42P01", "42883", "42704"})


def _constraint_of(exc: BaseException) -> str | None:
    match = _CONSTRAINT_IN_MESSAGE.search(str(exc))
    return match.group(1) if match else None


def translate_db_error(
    exc: BaseException, *, schema: str, in_transaction: bool = False
) -> GraphileWorkerError | None:
    """Map a database error raised by a worker statement to a named exception, if one fits.

    Returns ``None`` when the error is not one this library names; the caller re-raises
    the original then. With ``in_transaction`` (the statement ran in the caller's own
    transaction, without a savepoint), an error the server raised says that the
    transaction is aborted: PostgreSQL answers a later COMMIT with a silent rollback.
    """
    named = _translate(exc, schema)
    if named is not None and in_transaction and sqlstate_of(exc) is not None:
        named.args = (
            f"{named}; the enclosing transaction is aborted and will only roll back "
            "(use savepoint=True to keep it usable)",
        )
    return named


def _translate(exc: BaseException, schema: str) -> GraphileWorkerError | None:
    if isinstance(exc, UnicodeEncodeError):
        return InvalidCharacter(f"a text value cannot be encoded as UTF-8 ({exc})")
    state = sqlstate_of(exc)
    first_line = str(getattr(exc, "orig", exc)).strip().splitlines()[0:1]
    detail = first_line[0] if first_line else type(exc).__name__
    if (
        (state is None and "NUL (0x00)" in detail)
        or state == "22P05"
        or (state == "22P02" and "surrogate" in str(exc))
    ):
        return InvalidCharacter(
            f"a text value holds a character PostgreSQL cannot store, such as NUL or a lone "
            f"surrogate ({detail})"
        )
    if state == "GWBKM":
        return InvalidJobKeyMode(
            "invalid job_key_mode: expected 'replace', 'preserve_run_at' or 'unsafe_dedupe'"
        )
    if state == "23514":
        constraint = _constraint_of(exc)
        if constraint in _CONSTRAINT_ERRORS:
            cls, message = _CONSTRAINT_ERRORS[constraint]
            return cls(f"{message} ({detail})")
    if state == "22003":
        return ValueOutOfRange(
            f"a number is out of range; priority, attempts and max_attempts must fit a "
            f"smallint (-32768..32767) ({detail})"
        )
    if state == "22008":
        return ValueOutOfRange(f"a time is out of range ({detail})")
    if state == "21000" and "ON CONFLICT" in detail:
        return DuplicateJobKeyInBatch(f"two jobs in one batch share a job key ({detail})")
    if state in _MISSING_OBJECT_SQLSTATES and _names_worker_schema(state, detail, schema):
        return SchemaNotMigrated(schema)
    if state == "42501":
        return NotSchemaOwner(
            f"permission denied on the worker schema {schema!r}: connect as the role that "
            f"owns it (its tables use row-level security without policies) ({detail})"
        )
    return None


def _names_worker_schema(state: str, detail: str, schema: str) -> bool:
    """Whether the missing object of a 3F000/42P01/42883/42704 error is the worker's.

    The SQLSTATE says what kind of object is missing; the message names it, and names
    are never translated: the worker schema itself (``schema "gw" does not exist``) or an
    object it qualifies (``relation "gw._private_jobs"``, ``function gw.add_job(…)``).
    The name must stand whole (a schema ``gw`` is not ``gw2``), and qualify the object:
    another schema's objects, whatever they are called, are the caller's own business.
    """
    name = re.escape(schema)
    if state == "3F000":
        return re.search(rf"(?<![\w$.]){name}(?![\w$.])", detail) is not None
    return re.search(rf"(?<![\w$.]){name}\.", detail) is not None
