"""Named exceptions, and the translation of database errors into them.

Every error this library raises on purpose derives from :class:`GraphileWorkerError`.
Errors that come from the database keep the driver's exception as ``__cause__``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "DatabaseNewerThanLibrary",
    "DuplicateJobKeyInBatch",
    "GraphileWorkerError",
    "InvalidCharacter",
    "InvalidJobKey",
    "InvalidJobKeyMode",
    "InvalidJobSpec",
    "InvalidMaxAttempts",
    "InvalidSchemaName",
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
    "ValueOutOfRange",
    "sqlstate_of",
    "translate_db_error",
]


class GraphileWorkerError(Exception):
    """Base class of every error raised by sqla-graphile."""


class InvalidSchemaName(GraphileWorkerError, ValueError):
    """The worker schema name cannot be a PostgreSQL schema name."""


class MigrationError(GraphileWorkerError):
    """The worker schema cannot be migrated as asked."""


class SchemaNotMigrated(MigrationError):
    """The worker schema does not exist (yet) in this database."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        super().__init__(
            f"schema not migrated: the worker schema {schema!r} does not exist in this "
            "database; run `graphile-worker migrate` or `alembic upgrade heads` first"
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


class InvalidJobSpec(GraphileWorkerError, ValueError):
    """A job's specification breaks one of the schema's rules."""


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
    """A number does not fit its column (priority and attempts are ``smallint``)."""


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
    if state == "21000" and "ON CONFLICT" in detail:
        return DuplicateJobKeyInBatch(f"two jobs in one batch share a job key ({detail})")
    if state in ("3F000", "42P01", "42883") and _mentions_schema(detail, schema):
        return SchemaNotMigrated(schema)
    if state == "42501":
        return NotSchemaOwner(
            f"permission denied on the worker schema {schema!r}: connect as the role that "
            f"owns it (its tables use row-level security without policies) ({detail})"
        )
    return None


def _mentions_schema(detail: str, schema: str) -> bool:
    # An undefined function or relation inside the worker schema means it is missing or
    # unmigrated; the same error about another object is the caller's own.
    return schema in detail or "job_spec" in detail or "_private_" in detail
