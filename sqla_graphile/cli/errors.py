"""How the command line reports errors, and its exit statuses.

Each exception is classified (usage, expected failure, library error, database
unreachable, database error, or a bug) and rendered as one line, or as one JSON object
with ``--json``, with every secret of the database URL hidden.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click
import psycopg
from sqlalchemy.exc import DBAPIError, OperationalError

from .._urls import redact, redact_url
from ..errors import DatabaseNewerThanLibrary, GraphileWorkerError, sqlstate_of, translate_db_error

__all__ = [
    "EXIT_BREAKING_MIGRATION",
    "Error",
    "Failure",
    "Reported",
    "before_double_dash",
    "classify",
    "render",
    "translated",
]

#: Exit status when the worker schema holds a breaking migration newer than this library
#: (Node's): supervisors restart the worker, which must be upgraded first.
EXIT_BREAKING_MIGRATION = 57


class Failure(Exception):
    """A command's expected failure (a job that does not exist ...): one line, exit 1.

    ``details`` join the JSON error object (``missing`` lists what was not found).
    """

    def __init__(self, message: str, kind: str = "error", **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = details


class Reported(click.ClickException):
    """An error already rendered (text or JSON, secrets hidden), with its exit status."""

    def __init__(self, rendered: str, exit_code: int) -> None:
        super().__init__(rendered)
        self.rendered = rendered
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        """Print the rendered error (on stderr unless ``file`` is given)."""
        click.echo(self.rendered, file=file, err=file is None)


@dataclasses.dataclass
class Error:
    """What to say about an exception: its message, kind and exit status."""

    message: str
    kind: str
    exit_code: int = 1
    exception: BaseException | None = None
    #: The traceback is shown even without --verbose (internal errors: bugs).
    always_trace: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _is_connection_error(exc: BaseException) -> bool:
    """Whether the database could not be reached (as opposed to a failed statement).

    Connection failures carry no SQLSTATE, or one of the connection (08), authentication
    (28) or server-shutdown (57P) classes; a statement timeout or a lock timeout is an
    operational error too, but of a reachable database.
    """
    if isinstance(exc, DBAPIError):
        if not isinstance(exc, OperationalError):
            return False
        if exc.connection_invalidated:
            return True
    elif not isinstance(exc, psycopg.OperationalError):
        return False
    state = sqlstate_of(exc)
    return state is None or state.startswith(("08", "28", "57P"))


def classify(exc: Exception, url: str | None) -> Error:
    """What to say about ``exc``, raised by a command on the database at ``url``."""
    if isinstance(exc, click.UsageError):
        return Error(exc.format_message(), "usage", exc.exit_code, exc.__cause__)
    if isinstance(exc, click.ClickException):
        return Error(exc.format_message(), "error", exc.exit_code, exc.__cause__)
    if isinstance(exc, Failure):
        return Error(str(exc), exc.kind, 1, exc.__cause__, details=exc.details)
    if isinstance(exc, GraphileWorkerError):
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        breaking = isinstance(exc, DatabaseNewerThanLibrary)
        return Error(message, "error", EXIT_BREAKING_MIGRATION if breaking else 1, exc)
    if isinstance(exc, (DBAPIError, psycopg.Error)):
        if _is_connection_error(exc):
            where = redact_url(url) if url else "?"
            message = f"cannot reach the database at {where}: {_one_line(exc)}"
            return Error(message, "connection", 1, exc)
        return Error(f"database error: {_one_line(exc)}", "database", 1, exc)
    # Anything else is a bug (ours, or of code we called): shown with its traceback.
    message = f"{type(exc).__name__}: {_one_line(exc)}"
    return Error(message, "internal", 1, exc, always_trace=True)


def render(error: Error, *, as_json: bool, verbose: bool, secrets: Iterable[str]) -> str:
    """The error as one line (after its traceback if shown) or one JSON object."""
    secrets = frozenset(secrets)
    message = redact(error.message, secrets)  # before any escaping, which would hide them
    trace = None
    if error.exception is not None and (verbose or error.always_trace):
        exc = error.exception
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        trace = redact(text.rstrip(), secrets)
    if as_json:
        data: dict[str, Any] = {"error": message, "type": error.kind, **error.details}
        if error.exception is not None and error.kind != "usage":
            data["exception"] = type(error.exception).__name__
        if trace is not None:
            data["traceback"] = trace
        return json.dumps(data, ensure_ascii=False)
    if error.kind == "internal":
        line = f"internal error: {message} (a bug; please report it with the traceback)"
    else:
        line = f"error: {message}"
    return f"{trace}\n{line}" if trace else line


def before_double_dash(args: Sequence[str]) -> list[str]:
    """The arguments before ``--`` (after it, ``--json`` is an argument, not the option)."""
    return list(args[: args.index("--")] if "--" in args else args)


@contextlib.contextmanager
def translated(schema: str) -> Iterator[None]:
    """Database errors of statements the command line runs itself, as named exceptions."""
    try:
        yield
    except DBAPIError as exc:
        named = translate_db_error(exc, schema=schema)
        if named is None:
            raise
        raise named from exc
