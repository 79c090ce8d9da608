"""The ``graphile-worker`` command line (also ``python -m sqla_graphile``).

Exit status: 0 on success; 1 on a runtime error (one line on stderr, ``--verbose`` adds
the traceback), on a job or worker named that does not exist (nothing is changed then),
and on an internal error (a bug: always with its traceback); 2 on a usage error; 57 when
the database's worker schema is newer than this library. With ``--json`` the output is
JSON and so is an error (one object on stderr). No password of the database URL is ever
printed. The rules, case by case, are in the CLI reference (``docs/cli.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import importlib
import json
import logging
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.exc import DBAPIError, OperationalError

from ._admin import JobState
from ._urls import engine_from_url, normalize_url, redact, redact_url, url_secrets
from .durations import parse_duration as _parse_duration
from .errors import DatabaseNewerThanLibrary, GraphileWorkerError, sqlstate_of, translate_db_error
from .functions import worker_functions
from .health import DEFAULT_HEALTH_HOST
from .job import Job
from .recovery import SweepStaleWorkersOptions, WorkerRecoveryConfig
from .schema import DEFAULT_SCHEMA, quote_schema, validate_schema_name, worker_schema
from .specs import CleanupTask, JobKeyMode, JobSpec
from .utils import WorkerUtils

__all__ = ["EXIT_BREAKING_MIGRATION", "SUPPORTED_URLS", "main", "parse_duration", "parse_time"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: Exit status when the worker schema holds a breaking migration newer than this library
#: (Node's): supervisors restart the worker, which must be upgraded first.
EXIT_BREAKING_MIGRATION = 57

#: The database URLs the command line takes (it talks to PostgreSQL through psycopg 3).
SUPPORTED_URLS = "postgresql://, postgres:// or postgresql+psycopg:// (psycopg 3)"


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``5m``, ``1h30m``, ``250ms`` or plain seconds (``90``).

    The grammar of :func:`sqla_graphile.durations.parse_duration`, crontab time phrases'
    superset.
    """
    return _parse_duration(text)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time (``2026-01-02T03:04:05Z``) or ``now``; always tz-aware."""
    value = text.strip()
    if value.lower() == "now":
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2026-01-02T03:04:05Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone offset (add Z or +00:00)")
    return parsed


class _Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            duration = value
        else:
            try:
                duration = parse_duration(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if self.positive and duration <= timedelta(0):
            self.fail(f"{value!r} must be longer than 0", param, ctx)
        return duration


class _Time(click.ParamType):  # type: ignore[type-arg]
    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Name(click.ParamType):  # type: ignore[type-arg]
    """A task identifier, queue name, job key, flag or worker id: text, never empty."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail("must not be empty", param, ctx)
        return value


DURATION = _Duration()
#: Job ids are PostgreSQL bigints, from 1.
JOB_ID = click.IntRange(1, 2**63 - 1)
POSITIVE_DURATION = _Duration(positive=True)
TIME = _Time()
NAME = _Name()


def _checked_url(url: str) -> str:
    """``url`` if the command line can use it, else a usage error naming what it takes."""
    try:
        parsed = normalize_url(url)
    except Exception:  # whatever SQLAlchemy says, the URL itself is not echoed
        raise click.UsageError(
            f"--database-url is not a database URL; use {SUPPORTED_URLS}"
        ) from None
    if parsed.drivername != "postgresql+psycopg":
        scheme = url.partition("://")[0]
        named = f"{scheme}://" if re.fullmatch(r"[A-Za-z][\w+.-]*", scheme) else "this scheme"
        raise click.UsageError(f"--database-url: {named} is not supported; use {SUPPORTED_URLS}")
    return url


@dataclasses.dataclass
class _State:
    database_url: str | None
    schema: str
    as_json: bool
    verbose: bool
    _engine: Engine | None = None
    _utils: WorkerUtils | None = None

    def url(self) -> str:
        if not self.database_url:
            raise click.UsageError("no database: pass --database-url or set DATABASE_URL")
        return _checked_url(self.database_url)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = engine_from_url(self.url())
        return self._engine

    def utils(self) -> WorkerUtils:
        if self._utils is None:
            self._utils = WorkerUtils(self.engine(), self.schema)
        return self._utils

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = self._utils = None


# -- errors -------------------------------------------------------------------------------


class _Failure(Exception):
    """A command's expected failure (a job that does not exist ...): one line, exit 1.

    ``details`` join the JSON error object (``missing`` lists what was not found).
    """

    def __init__(self, message: str, kind: str = "error", **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = details


class _Reported(click.ClickException):
    """An error already rendered (text or JSON, secrets hidden), with its exit status."""

    def __init__(self, rendered: str, exit_code: int) -> None:
        super().__init__(rendered)
        self.rendered = rendered
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        click.echo(self.rendered, file=file, err=file is None)


@dataclasses.dataclass
class _Error:
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


def _classify(exc: Exception, url: str | None) -> _Error:
    if isinstance(exc, click.UsageError):
        return _Error(exc.format_message(), "usage", exc.exit_code, exc.__cause__)
    if isinstance(exc, click.ClickException):
        return _Error(exc.format_message(), "error", exc.exit_code, exc.__cause__)
    if isinstance(exc, _Failure):
        return _Error(str(exc), exc.kind, 1, exc.__cause__, details=exc.details)
    if isinstance(exc, GraphileWorkerError):
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        breaking = isinstance(exc, DatabaseNewerThanLibrary)
        return _Error(message, "error", EXIT_BREAKING_MIGRATION if breaking else 1, exc)
    if isinstance(exc, (DBAPIError, psycopg.Error)):
        if _is_connection_error(exc):
            where = redact_url(url) if url else "?"
            message = f"cannot reach the database at {where}: {_one_line(exc)}"
            return _Error(message, "connection", 1, exc)
        return _Error(f"database error: {_one_line(exc)}", "database", 1, exc)
    # Anything else is a bug (ours, or of code we called): shown with its traceback.
    message = f"{type(exc).__name__}: {_one_line(exc)}"
    return _Error(message, "internal", 1, exc, always_trace=True)


def _render(error: _Error, *, as_json: bool, verbose: bool, secrets: Iterable[str]) -> str:
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


def _before_double_dash(args: Sequence[str]) -> list[str]:
    return list(args[: args.index("--")] if "--" in args else args)


class _Group(click.Group):
    """Reports every error by the rules of the CLI reference (its "Exit status and errors")."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        json_asked = "--json" in _before_double_dash(args)  # parsing consumes ``args``
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if not json_asked:
                raise
            error = _Error(exc.format_message(), "usage", exc.exit_code)
            raise _Reported(
                _render(error, as_json=True, verbose=False, secrets=()), exc.exit_code
            ) from None

    def invoke(self, ctx: click.Context) -> Any:
        # --json after the command name is only seen once the command's options are parsed:
        # the raw arguments tell whether an error before that must be JSON too.
        protected = getattr(ctx, "_protected_args", None)  # click < 8.2: protected_args
        pending = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        json_asked = bool(ctx.params.get("as_json")) or "--json" in _before_double_dash(pending)
        verbose = bool(ctx.params.get("verbose"))
        url = ctx.params.get("database_url")
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, _Reported):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # a closed pipe (`| head`): click exits quietly
            state = ctx.find_object(_State)
            as_json = json_asked or (state is not None and state.as_json)
            if isinstance(exc, click.ClickException) and not as_json:
                raise  # click's own report, with the usage line
            error = _classify(exc, url)
            rendered = _render(error, as_json=as_json, verbose=verbose, secrets=url_secrets(url))
            raise _Reported(rendered, error.exit_code) from None
        finally:
            state = ctx.find_object(_State)
            if state is not None:
                state.close()


def _json_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    state = ctx.find_object(_State)
    if value and state is not None:
        state.as_json = True


def _pass_state(fn: _F) -> _F:
    """Pass the global state, and accept ``--json`` after the command name too."""
    with_json = click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_json_after_command,
        help="Machine-readable JSON output (same as the global --json).",
    )
    return with_json(click.pass_obj(fn))  # type: ignore[return-value]


class _RedactingFormatter(logging.Formatter):
    """A log formatter that hides the database URL's secrets."""

    def __init__(self, fmt: str, secrets: frozenset[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


@contextlib.contextmanager
def _translated(schema: str) -> Iterator[None]:
    """Database errors of statements the command line runs itself, as named exceptions."""
    try:
        yield
    except DBAPIError as exc:
        named = translate_db_error(exc, schema=schema)
        if named is None:
            raise
        raise named from exc


# -- output ------------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _age(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "in " + _age(-delta)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts[:2])


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Render rows as an aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _job_state(job: Job) -> str:
    if job.locked_at is not None:
        return "locked"
    if job.attempts >= job.max_attempts:
        return "failed"
    return "ready" if job.run_at <= datetime.now(timezone.utc) else "scheduled"


def _jobs_table(jobs: Sequence[Job]) -> str:
    return table(
        [
            "ID",
            "TASK",
            "QUEUE",
            "STATE",
            "PRIORITY",
            "RUN AT",
            "ATTEMPTS",
            "KEY",
            "LOCKED BY",
            "LAST ERROR",
        ],
        [
            (
                j.id,
                j.task_identifier,
                j.queue_name,
                _job_state(j),
                j.priority,
                _when(j.run_at),
                f"{j.attempts}/{j.max_attempts}",
                j.key,
                j.locked_by,
                (j.last_error or "").splitlines()[0][:60] if j.last_error else None,
            )
            for j in jobs
        ],
    )


def _emit(state: _State, data: Any, human: str) -> None:
    if state.as_json:
        click.echo(json.dumps(_to_jsonable(data), ensure_ascii=False))
    else:
        click.echo(human)


# -- commands -----------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help=f"PostgreSQL URL: {SUPPORTED_URLS} (default: $DATABASE_URL).",
)
@click.option(
    "--schema",
    envvar="GRAPHILE_WORKER_SCHEMA",
    default=DEFAULT_SCHEMA,
    show_default=True,
    help="Worker schema (also $GRAPHILE_WORKER_SCHEMA).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors; debug logging.")
@click.version_option(package_name="sqla-graphile")
@click.pass_context
def main(
    ctx: click.Context, database_url: str | None, schema: str, as_json: bool, verbose: bool
) -> None:
    """Operate a Graphile Worker job queue: migrate, add, inspect, fix jobs; run workers."""
    try:
        validate_schema_name(schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--schema") from None
    ctx.obj = _State(database_url, schema, as_json, verbose)


@dataclasses.dataclass(frozen=True)
class _SchemaVersion:
    migration: int | None  # Graphile Worker's ledger: its highest migration
    revisions: tuple[str, ...]  # this library's Alembic revisions (heads) applied


def _schema_version(engine: Engine, schema: str) -> _SchemaVersion:
    from .migrations import VERSION_TABLE, read_ledger

    with engine.connect() as connection:
        ledger = read_ledger(connection, schema)
        table = f"{quote_schema(schema)}.{VERSION_TABLE}"
        revisions: tuple[str, ...] = ()
        if ledger.schema_exists and connection.scalar(select(func.to_regclass(table))):
            # Built with Core: the schema name is data here, never SQL text to parse.
            versions = sa_table(VERSION_TABLE, sa_column("version_num"), schema=schema)
            revisions = tuple(sorted(connection.scalars(select(versions.c.version_num))))
    return _SchemaVersion(ledger.highest, revisions)


def _revisions_applied(schema: str, before: _SchemaVersion, after: _SchemaVersion) -> list[str]:
    """The revisions that took the schema from ``before`` to ``after``, oldest first."""
    from alembic.script import ScriptDirectory

    from .migrations import alembic_config

    if before.revisions == after.revisions:
        return []
    script = ScriptDirectory.from_config(alembic_config(schema))
    try:
        between = script.iterate_revisions(after.revisions, before.revisions or "base")
        return [revision.revision for revision in reversed(list(between))]
    except Exception:  # a revision this library does not know: say what is certain
        return [revision for revision in after.revisions if revision not in before.revisions]


@main.command()
@_pass_state
def migrate(state: _State) -> None:
    """Create or update the worker schema (Node graphile-worker 0.18's).

    Reports what was applied: Graphile Worker's migration number before and after, and
    this library's revisions run (none when the schema was up to date).
    """
    engine = state.engine()
    before = _schema_version(engine, state.schema)
    state.utils().migrate()
    after = _schema_version(engine, state.schema)
    applied = _revisions_applied(state.schema, before, after)
    data = {
        "schema": state.schema,
        "migrated": bool(applied) or before.migration != after.migration,
        "from_migration": before.migration,
        "to_migration": after.migration,
        "revisions_applied": applied,
    }
    if data["migrated"]:
        human = (
            f"Migrated schema {state.schema!r}: Graphile Worker migration "
            f"{before.migration or 'none'} -> {after.migration}; revisions applied: "
            f"{', '.join(applied) or 'none'}."
        )
    else:
        human = (
            f"Schema {state.schema!r} is up to date (Graphile Worker migration "
            f"{after.migration}); nothing to apply."
        )
    _emit(state, data, human)


def _read_payload(payload: str | None, payload_file: str | None) -> Any:
    """The JSON payload of ``add``, from --payload, a file or stdin (``-``)."""
    source = payload
    if payload_file == "-":
        source = sys.stdin.read()
    elif payload_file is not None:
        try:
            source = Path(payload_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(str(exc), param_hint="--payload-file") from None
    try:
        return json.loads(source) if source is not None else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"not valid JSON: {exc}", param_hint="--payload-file" if payload_file else "--payload"
        ) from None


@main.command()
@click.argument("identifier", type=NAME)
@click.option("--payload", metavar="JSON", help="JSON payload (default {}).")
@click.option(
    "--payload-file",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="Read the JSON payload from this file ('-': standard input).",
)
@click.option("--queue", "queue_name", type=NAME, help="Named queue (its jobs run one at a time).")
@click.option("--run-at", type=TIME, help="RFC 3339 time or 'now'.")
@click.option("--max-attempts", type=click.IntRange(min=1))
@click.option("--key", "job_key", type=NAME, help="Job key (deduplicates).")
@click.option("--job-key-mode", type=click.Choice([m.value for m in JobKeyMode]))
@click.option("--priority", type=int, help="Lower runs first.")
@click.option("--flag", "flags", type=NAME, multiple=True, help="A flag (repeatable).")
@_pass_state
def add(
    state: _State,
    identifier: str,
    payload: str | None,
    payload_file: str | None,
    queue_name: str | None,
    run_at: datetime | None,
    max_attempts: int | None,
    job_key: str | None,
    job_key_mode: str | None,
    priority: int | None,
    flags: tuple[str, ...],
) -> None:
    """Add a job for task IDENTIFIER."""
    if payload is not None and payload_file is not None:
        raise click.UsageError("give --payload or --payload-file, not both")
    if job_key_mode is not None and job_key is None:
        raise click.UsageError("--job-key-mode needs --key")
    value = _read_payload(payload, payload_file)
    spec = JobSpec(
        queue_name=queue_name,
        run_at=run_at,
        max_attempts=max_attempts,
        job_key=job_key,
        job_key_mode=job_key_mode,
        priority=priority,
        flags=list(flags) or None,
    )
    job = state.utils().add_raw_job(identifier, value, spec)
    _emit(state, job, f"Added job {job.id} ({job.task_identifier}), runs at {_when(job.run_at)}.")


@main.command("list")
@click.option(
    "--state",
    "job_state",
    type=click.Choice([s.value for s in JobState]),
    default=JobState.ALL.value,
    show_default=True,
)
@click.option("--task", "task_identifier", type=NAME, help="Only jobs of this task.")
@click.option("--queue", "queue_name", type=NAME, help="Only jobs of this queue.")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@_pass_state
def list_(
    state: _State,
    job_state: str,
    task_identifier: str | None,
    queue_name: str | None,
    limit: int,
    offset: int,
) -> None:
    """List jobs, by priority then run time."""
    jobs = state.utils().list_jobs(
        job_state,
        task_identifier=task_identifier,
        queue_name=queue_name,
        limit=limit,
        offset=offset,
    )
    _emit(state, jobs, _jobs_table(jobs) if jobs else "No jobs.")


def _no_such_jobs(missing: Sequence[int], changed: bool) -> _Failure:
    ids = ", ".join(map(str, missing))
    what = f"no job with id {ids}" if len(missing) == 1 else f"no jobs with ids {ids}"
    return _Failure(
        what + ("; nothing was changed" if changed else ""), "not_found", missing=list(missing)
    )


@main.command()
@click.argument("job_id", type=JOB_ID)
@_pass_state
def show(state: _State, job_id: int) -> None:
    """Show one job, with its payload."""
    job = state.utils().get_job(job_id)
    if job is None:
        raise _no_such_jobs([job_id], changed=False)
    fields = _to_jsonable(job)
    fields["state"] = _job_state(job)
    _emit(state, fields, _job_details(job))


def _job_details(job: Job) -> str:
    """``name  value`` lines for one job; the payload last, as indented JSON."""
    lines: list[tuple[str, Any]] = [
        ("id", job.id),
        ("task", job.task_identifier),
        ("queue", job.queue_name),
        ("state", _job_state(job)),
        ("priority", job.priority),
        ("run at", _when(job.run_at)),
        ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("key", job.key),
        ("revision", job.revision),
        ("flags", ", ".join(sorted(job.flags)) if job.flags else None),
        ("locked by", job.locked_by),
        ("locked at", _when(job.locked_at)),
        ("created at", _when(job.created_at)),
        ("updated at", _when(job.updated_at)),
        ("last error", job.last_error),
        ("payload", json.dumps(job.payload, ensure_ascii=False, indent=2)),
    ]
    width = max(len(name) for name, _ in lines)
    indent = "\n" + " " * (width + 2)
    rendered = [("-" if value is None else str(value)).replace("\n", indent) for _, value in lines]
    return "\n".join(
        f"{name.ljust(width)}  {text}" for (name, _), text in zip(lines, rendered, strict=True)
    )


def _act_on_jobs(
    state: _State,
    verb: str,
    job_ids: Sequence[int],
    act: Callable[[Connection, list[int]], Iterable[int]],
) -> None:
    """Run ``act`` on the jobs in one transaction: all of them exist, or nothing changes.

    ``act`` returns the ids it changed; of the others, those that exist are locked by a
    worker (skipped, reported), and any that does not exist rolls everything back.
    """
    asked = list(dict.fromkeys(job_ids))
    jobs = worker_schema(state.schema).private_jobs
    with _translated(state.schema), state.engine().begin() as connection:
        done = set(act(connection, asked))
        rest = [job_id for job_id in asked if job_id not in done]
        existing = (
            set(connection.scalars(select(jobs.c.id).where(jobs.c.id.in_(rest)))) if rest else set()
        )
        missing = [job_id for job_id in rest if job_id not in existing]
        if missing:
            raise _no_such_jobs(missing, changed=True)  # leaving the block rolls back
    changed = [job_id for job_id in asked if job_id in done]
    skipped = [job_id for job_id in rest if job_id in existing]
    human = f"{verb.capitalize()} {len(changed)} job(s): {', '.join(map(str, changed)) or '-'}."
    if skipped:
        human += f"\nSkipped (locked by a worker): {', '.join(map(str, skipped))}."
    _emit(state, {verb: changed, "skipped": skipped}, human)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@_pass_state
def complete(state: _State, job_ids: tuple[int, ...]) -> None:
    """Mark jobs complete (delete them); locked jobs are skipped."""

    def act(connection: Connection, ids: list[int]) -> Iterable[int]:
        utils = state.utils().using(connection, savepoint=True)
        return [job.id for job in utils.complete_jobs(ids)]

    _act_on_jobs(state, "completed", job_ids, act)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@click.option("--reason", help="Stored as last_error.")
@_pass_state
def fail(state: _State, job_ids: tuple[int, ...], reason: str | None) -> None:
    """Fail jobs permanently; locked jobs are skipped."""

    def act(connection: Connection, ids: list[int]) -> Iterable[int]:
        utils = state.utils().using(connection, savepoint=True)
        return [job.id for job in utils.permanently_fail_jobs(ids, reason)]

    _act_on_jobs(state, "failed", job_ids, act)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@click.option("--run-at", type=TIME, help="Run at this RFC 3339 time ('now': this machine's).")
@click.option("--now", "run_now", is_flag=True, help="Run now, by the database's clock.")
@click.option("--priority", type=int)
@click.option("--attempts", type=click.IntRange(min=0))
@click.option("--max-attempts", type=click.IntRange(min=1))
@_pass_state
def reschedule(
    state: _State,
    job_ids: tuple[int, ...],
    run_at: datetime | None,
    run_now: bool,
    priority: int | None,
    attempts: int | None,
    max_attempts: int | None,
) -> None:
    """Change the run time, priority or attempts of jobs; locked jobs are skipped.

    Without --run-at or --now the run time is kept.
    """
    if run_at is not None and run_now:
        raise click.UsageError("give --run-at or --now, not both")
    if run_at is None and not run_now and (priority, attempts, max_attempts) == (None,) * 3:
        raise click.UsageError(
            "nothing to change: give --run-at, --now, --priority, --attempts or --max-attempts"
        )
    functions = worker_functions(state.schema)

    def act(connection: Connection, ids: list[int]) -> Iterable[int]:
        # The schema's function keeps each job's run_at when given NULL.
        call = functions.reschedule_jobs(
            ids,
            run_at=func.now() if run_now else run_at,
            priority=priority,
            attempts=attempts,
            max_attempts=max_attempts,
        )
        rows = functions.rows_of(call)
        return list(connection.scalars(select(rows.c.id)))

    _act_on_jobs(state, "rescheduled", job_ids, act)


@main.command()
@click.argument("job_key", type=NAME)
@_pass_state
def remove(state: _State, job_key: str) -> None:
    """Remove the job with JOB_KEY (a running one just stops retrying)."""
    job = state.utils().remove_job(job_key)
    if job is None:
        raise _Failure(f"no job with key {job_key!r}", "not_found", missing=[job_key])
    how = "stopped retrying (it is running)" if job.locked_at else "removed"
    _emit(state, {"job": job, "removed": job.locked_at is None}, f"Job {job.id} {how}.")


_CLEANUP_NAMES = {t.value.lower().replace("_", "-"): t for t in CleanupTask}


@main.command()
@click.argument("tasks", nargs=-1)
@_pass_state
def cleanup(state: _State, tasks: tuple[str, ...]) -> None:
    """Run maintenance TASKS (gc-task-identifiers, gc-job-queues, delete-permanently-failed-jobs).

    With no TASKS, the two garbage collections only; deleting failed jobs must be named.
    Collecting task identifiers while Node workers run breaks their cached task ids.
    """
    chosen = []
    for name in tasks:
        key = name.lower().replace("_", "-")
        if key not in _CLEANUP_NAMES:
            raise click.BadParameter(
                f"{name!r}; choose from {', '.join(_CLEANUP_NAMES)}", param_hint="TASKS"
            )
        chosen.append(_CLEANUP_NAMES[key])
    run = chosen or [CleanupTask.GC_TASK_IDENTIFIERS, CleanupTask.GC_JOB_QUEUES]
    state.utils().cleanup(run)
    names = [t.value.lower().replace("_", "-") for t in run]
    _emit(state, {"ran": [t.value for t in run]}, f"Ran {', '.join(names)}.")


@main.command("force-unlock")
@click.argument("worker_ids", nargs=-1, required=True, type=NAME)
@_pass_state
def force_unlock(state: _State, worker_ids: tuple[str, ...]) -> None:
    """Release every job and queue lock of WORKER_IDS.

    Only for workers known to be dead: a live worker's job would run twice at once.
    Every worker id must hold a lock; if one holds none, nothing is released.
    """
    ids = list(dict.fromkeys(worker_ids))
    schema = worker_schema(state.schema)
    with _translated(state.schema), state.engine().begin() as connection:
        # Counted under row locks, so the counts are exactly what is released below.
        held_jobs, held_queues = (
            Counter(
                connection.scalars(
                    select(table.c.locked_by).where(table.c.locked_by.in_(ids)).with_for_update()
                )
            )
            for table in (schema.private_jobs, schema.private_job_queues)
        )
        missing = [w for w in ids if not held_jobs[w] and not held_queues[w]]
        if missing:
            names = ", ".join(map(repr, missing))
            which = f"worker id {names} holds" if len(missing) == 1 else f"worker ids {names} hold"
            raise _Failure(f"{which} no lock; nothing was released", "not_found", missing=missing)
        state.utils().using(connection, savepoint=True).force_unlock_workers(ids)
    jobs, queues = sum(held_jobs.values()), sum(held_queues.values())
    _emit(
        state,
        {"unlocked_worker_ids": ids, "released_job_locks": jobs, "released_queue_locks": queues},
        f"Released {jobs} job lock(s) and {queues} queue lock(s) of {len(ids)} worker id(s).",
    )


@main.command("sweep-stale-workers")
@click.option(
    "--sweep-threshold", type=POSITIVE_DURATION, help="Heartbeat age of a dead worker (5m)."
)
@click.option("--recovery-delay", type=DURATION, help="Wait before recovered jobs run (30s).")
@click.option("--dry-run", is_flag=True, help="Report what would be recovered; change nothing.")
@_pass_state
def sweep_stale_workers(
    state: _State,
    sweep_threshold: timedelta | None,
    recovery_delay: timedelta | None,
    dry_run: bool,
) -> None:
    """Recover the jobs of workers that stopped heartbeating."""
    result = state.utils().sweep_stale_workers_with_config(
        WorkerRecoveryConfig(),
        SweepStaleWorkersOptions(
            sweep_threshold=sweep_threshold, recovery_delay=recovery_delay, dry_run=dry_run
        ),
    )
    if result.already_running:
        human = "Another sweep is running; nothing was done."
    else:
        verb = "Would recover" if dry_run else "Recovered"
        human = (
            f"{verb} {result.recovered_count} job(s) and {len(result.queue_names)} queue(s) "
            f"from {len(result.worker_ids)} worker(s)"
            + (f": {', '.join(result.worker_ids)}." if result.worker_ids else ".")
        )
    _emit(state, {**_to_jsonable(result), "recovered_count": result.recovered_count}, human)


@main.command()
@click.option("--threshold", type=DURATION, default="5m", show_default=True)
@_pass_state
def workers(state: _State, threshold: timedelta) -> None:
    """Registered workers (with heartbeat age) and every lock holder."""
    utils = state.utils()
    registered = utils.list_active_workers(threshold)
    holders = utils.lock_holders()
    now = datetime.now(timezone.utc)
    human = "Registered workers:\n" + (
        table(
            ["WORKER", "STARTED", "HEARTBEAT AGE", "STALE", "PID", "HOST"],
            [
                (
                    w.worker_id,
                    _when(w.started_at),
                    _age(w.heartbeat_age),
                    "yes" if w.is_stale else "no",
                    (w.metadata or {}).get("pid"),
                    (w.metadata or {}).get("host"),
                )
                for w in registered
            ],
        )
        if registered
        else "  none"
    )
    human += "\n\nLock holders:\n" + (
        table(
            ["WORKER", "JOBS", "QUEUES", "OLDEST LOCK AGE", "HEARTBEAT AGE"],
            [
                (
                    h.worker_id,
                    h.locked_jobs,
                    h.locked_queues,
                    _age(now - h.oldest_lock_at),
                    _age(now - h.last_heartbeat_at)
                    if h.registered and h.last_heartbeat_at is not None
                    else "never (unregistered: 4-hour lock expiry applies)",
                )
                for h in holders
            ],
        )
        if holders
        else "  none"
    )
    _emit(state, {"registered": registered, "lock_holders": holders}, human)


@main.command()
@_pass_state
def stats(state: _State) -> None:
    """Job counts by state and per queue, and the oldest ready job's age."""
    result = state.utils().stats()
    human = table(
        ["READY", "SCHEDULED", "LOCKED", "FAILED", "TOTAL", "OLDEST READY"],
        [
            (
                result.ready,
                result.scheduled,
                result.locked,
                result.failed,
                result.total,
                _age(result.oldest_ready_age),
            )
        ],
    )
    if result.queues:
        human += "\n\n" + table(
            ["QUEUE", "JOBS", "LOCKED BY"],
            [(q.queue_name, q.jobs, q.locked_by) for q in result.queues],
        )
    _emit(state, result, human)


@main.command()
@click.option(
    "--worker-id",
    "worker_ids",
    type=NAME,
    multiple=True,
    help="Also check that this worker is registered and heartbeats (repeatable).",
)
@click.option(
    "--min-workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also check that at least this many registered workers heartbeat.",
)
@click.option(
    "--threshold",
    type=POSITIVE_DURATION,
    default="5m",
    show_default=True,
    help="Heartbeat age (by the database's clock) past which a worker is not healthy.",
)
@_pass_state
def health(
    state: _State, worker_ids: tuple[str, ...], min_workers: int, threshold: timedelta
) -> None:
    """Check the database for workers: exit 0 when healthy, 1 when not.

    Checks that the database is reachable and that the worker schema is migrated and not
    newer than this library; with --worker-id or --min-workers, that workers heartbeat.
    Each check is printed (JSON: "healthy" and "checks"), failed ones too.
    """
    from .health import check_health

    url = state.url()
    report = check_health(
        url, state.schema, worker_ids=worker_ids, min_workers=min_workers, threshold=threshold
    )
    secrets = url_secrets(url)
    checks = [
        {"name": check.name, "ok": check.ok, "detail": redact(check.detail, secrets)}
        for check in report.checks
    ]
    human = "\n".join(
        f"{'ok' if check['ok'] else 'FAIL':<5} {check['name']}: {check['detail']}"
        for check in checks
    )
    human += "\n" + ("healthy" if report.healthy else "not healthy")
    _emit(state, {"healthy": report.healthy, "checks": checks}, human)
    if not report.healthy:
        raise click.exceptions.Exit(1)


@main.command()
@click.option(
    "--tasks",
    "tasks_spec",
    required=True,
    envvar="GRAPHILE_WORKER_TASKS",
    show_envvar=True,
    metavar="MODULE[:ATTR]",
    help="Importable module (or module:attribute) holding the task handlers.",
)
@click.option(
    "--crontab",
    envvar="GRAPHILE_WORKER_CRONTAB",
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Crontab file in Node graphile-worker's format.",
)
@click.option(
    "--concurrency",
    envvar="GRAPHILE_WORKER_CONCURRENCY",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
)
@click.option(
    "--poll-interval",
    envvar="GRAPHILE_WORKER_POLL_INTERVAL",
    show_envvar=True,
    type=POSITIVE_DURATION,
    default="2s",
    show_default=True,
)
@click.option(
    "--forbidden-flag",
    "forbidden_flags",
    envvar="GRAPHILE_WORKER_FORBIDDEN_FLAGS",
    show_envvar=True,
    type=NAME,
    multiple=True,
    help="Leave the jobs carrying this flag alone (repeatable; the variable: flags "
    "separated by spaces).",
)
@click.option(
    "--listen/--no-listen",
    envvar="GRAPHILE_WORKER_LISTEN",
    show_envvar=True,
    default=True,
    show_default=True,
    help="LISTEN for new jobs and migrations; with --no-listen, only poll.",
)
@click.option(
    "--local-queue-size",
    envvar="GRAPHILE_WORKER_LOCAL_QUEUE_SIZE",
    show_envvar=True,
    type=click.IntRange(min=0),
    help="Jobs fetched ahead per fetch (default: max(100, 4 x concurrency); 0: none).",
)
@click.option(
    "--complete-batch-delay",
    envvar="GRAPHILE_WORKER_COMPLETE_BATCH_DELAY",
    show_envvar=True,
    type=DURATION,
    help="Collect completions/failures this long before writing them (default 0).",
)
@click.option(
    "--shutdown-grace-period",
    envvar="GRAPHILE_WORKER_SHUTDOWN_GRACE_PERIOD",
    show_envvar=True,
    type=DURATION,
    help="After SIGINT/SIGTERM, how long running jobs may finish before they are cancelled "
    "and failed (5s).",
)
@click.option(
    "--once",
    envvar="GRAPHILE_WORKER_ONCE",
    show_envvar=True,
    is_flag=True,
    help="Run until no job is runnable, then exit.",
)
@click.option(
    "--recovery/--no-recovery",
    envvar="GRAPHILE_WORKER_RECOVERY",
    show_envvar=True,
    default=None,
    help="Register, heartbeat and sweep dead workers' jobs (crash recovery; default: on "
    "when the schema has the worker registry, as every schema this library migrated).",
)
@click.option(
    "--statement-timeout",
    envvar="GRAPHILE_WORKER_STATEMENT_TIMEOUT",
    show_envvar=True,
    type=POSITIVE_DURATION,
    help="Time limit of each worker statement; past it the link is cut and retried (30s).",
)
@click.option(
    "--job-timeout",
    envvar="GRAPHILE_WORKER_JOB_TIMEOUT",
    show_envvar=True,
    type=POSITIVE_DURATION,
    help="Time limit of each job whose task sets no timeout; past it the job fails (none).",
)
@click.option(
    "--progress-interval",
    envvar="GRAPHILE_WORKER_PROGRESS_INTERVAL",
    show_envvar=True,
    type=POSITIVE_DURATION,
    default="5s",
    show_default=True,
)
@click.option(
    "--processes",
    envvar="GRAPHILE_WORKER_PROCESSES",
    show_envvar=True,
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to run and supervise (restarted when they die); the crontab "
    "runs in one of them.",
)
@click.option(
    "--health-port",
    envvar="GRAPHILE_WORKER_HEALTH_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    help="Serve /livez and /readyz over HTTP on this port (0: any free port).",
)
@click.option(
    "--health-host",
    envvar="GRAPHILE_WORKER_HEALTH_HOST",
    show_envvar=True,
    default=DEFAULT_HEALTH_HOST,
    show_default=True,
    help="Address of the health endpoint (0.0.0.0 in a container, for probes from outside).",
)
@_pass_state
def run(
    state: _State,
    tasks_spec: str,
    crontab: Path | None,
    concurrency: int,
    poll_interval: timedelta,
    forbidden_flags: tuple[str, ...],
    listen: bool,
    local_queue_size: int | None,
    complete_batch_delay: timedelta | None,
    shutdown_grace_period: timedelta | None,
    once: bool,
    recovery: bool | None,
    statement_timeout: timedelta | None,
    job_timeout: timedelta | None,
    progress_interval: timedelta,
    processes: int,
    health_port: int | None,
    health_host: str,
) -> None:
    """Start a worker for the handlers in --tasks (SIGINT/SIGTERM stop it gracefully).

    It prints a summary when it stops; an error (such as an unreachable database) gives
    the error line alone. Every option can also be set by the environment variable
    shown. With --processes N, N worker processes run under a supervisor that restarts
    those that die; it exits 57 when one meets a breaking migration, and 1 when they
    keep dying (more than 5 deaths within 60 s).
    """
    from .cron import CrontabError
    from .hooks import Hooks
    from .progress import Progress
    from .worker import Worker
    from .worker.tasks import TaskRegistry

    url = state.url()
    if once and processes > 1:
        raise click.UsageError("--once runs one worker; it cannot be combined with --processes")
    if str(Path.cwd()) not in sys.path:
        # Task modules are usually the application's own, next to where it is run.
        sys.path.insert(0, str(Path.cwd()))
    handlers = load_tasks(tasks_spec)
    try:
        TaskRegistry.build(handlers)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--tasks") from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", url_secrets(url))
    )
    logging.basicConfig(level=logging.DEBUG if state.verbose else logging.INFO, handlers=[handler])
    progress = Progress(interval=progress_interval.total_seconds())
    hooks = progress.attach(Hooks())
    options: dict[str, Any] = {}
    if local_queue_size is not None:
        options["local_queue_size"] = local_queue_size
    if complete_batch_delay is not None:
        options["complete_batch_delay"] = complete_batch_delay.total_seconds()
    if recovery is not None:
        options["recovery"] = WorkerRecoveryConfig(enabled=recovery)
    if statement_timeout is not None:
        options["statement_timeout"] = statement_timeout.total_seconds()
    if shutdown_grace_period is not None:
        options["shutdown_grace_period"] = shutdown_grace_period.total_seconds()
    if job_timeout is not None:
        options["job_timeout"] = job_timeout.total_seconds()
    options.update(
        schema=state.schema,
        concurrency=concurrency,
        poll_interval=poll_interval.total_seconds(),
        forbidden_flags=list(forbidden_flags) or None,
        listen=listen,
        crontab=crontab,
    )
    try:
        worker = Worker(url, handlers, hooks=hooks, **options)
    except CrontabError as exc:
        raise click.BadParameter(str(exc), param_hint="--crontab") from None
    if processes > 1:
        worker.close()
        _run_processes(
            state, url, tasks_spec, options, processes, progress, health_port, health_host
        )
        return
    if health_port is not None:
        _serve_health(worker, health_port, health_host)
    progress.start()
    try:
        worker.run_once() if once else worker.run()
    except BaseException:
        progress.stop(summary=False)  # the error is the whole report
        raise
    finally:
        worker.close()
    progress.stop()
    _emit(
        state,
        {
            "completed": progress.completed,
            "failed": progress.failed,
            "permanently_failed": progress.permanently_failed,
        },
        f"Worker stopped: {progress.line()}.",
    )


def _health_socket_error(host: str, port: int, exc: OSError) -> _Failure:
    return _Failure(f"cannot serve the health endpoint on {host}:{port}: {exc.strerror or exc}")


def _serve_health(worker: Any, port: int, host: str) -> None:
    from .health import serve_health

    try:
        serve_health(worker, port, host)
    except OSError as exc:
        raise _health_socket_error(host, port, exc) from exc


def _run_processes(
    state: _State,
    url: str,
    tasks_spec: str,
    options: dict[str, Any],
    processes: int,
    progress: Any,
    health_port: int | None,
    health_host: str,
) -> None:
    """``run --processes N``: a supervisor of N worker processes (see ``supervisor``)."""
    from .errors import SchemaNotMigrated
    from .migrations import check_database
    from .supervisor import EXIT_BREAKING_MIGRATION, Supervisor, _CliWorkers

    # Checked once here, so that a database no worker can use fails as one worker would,
    # rather than as processes dying until the supervisor gives up.
    with state.engine().connect() as connection:
        ledger = check_database(connection, state.schema)
    if not ledger.table_exists:
        raise SchemaNotMigrated(state.schema)
    state.close()  # the supervisor itself holds no connection while it runs
    try:
        supervisor = Supervisor(
            _CliWorkers(url, tasks_spec, options, verbose=state.verbose),
            processes,
            health_port=health_port,
            health_host=health_host,
            progress=progress,
        )
    except OSError as exc:
        raise _health_socket_error(health_host, health_port or 0, exc) from exc
    progress.start()
    try:
        code = supervisor.run()
    except BaseException:
        progress.stop(summary=False)
        raise
    progress.update(*supervisor.counts)
    progress.stop(summary=code == 0)
    if code == EXIT_BREAKING_MIGRATION:
        error = _Error(
            f"the worker schema {state.schema!r} has a breaking migration newer than this "
            "library: upgrade sqla-graphile (the worker processes were stopped)",
            "error",
            EXIT_BREAKING_MIGRATION,
        )
        raise _Reported(_render(error, as_json=state.as_json, verbose=False, secrets=()), code)
    if code != 0:
        raise _Failure(f"the supervisor stopped: {supervisor.failure}")
    _emit(
        state,
        {
            "completed": progress.completed,
            "failed": progress.failed,
            "permanently_failed": progress.permanently_failed,
            "processes": processes,
            "restarts": supervisor.restarts,
        },
        f"Workers stopped ({processes} processes, {supervisor.restarts} restarts): "
        f"{progress.line()}.",
    )


@main.command()
@click.option(
    "--timeout",
    type=POSITIVE_DURATION,
    default="60s",
    show_default=True,
    help="Give up if the jobs are not done by then (counted from the worker's start).",
)
@_pass_state
def demo(state: _State, timeout: timedelta) -> None:
    """Run the main job end to end and show what happened.

    Migrates, writes orders and enqueues their jobs in one transaction (and rolls back
    another), runs a worker until the jobs are done (one fails once and is retried),
    and prints progress and a table of what ran. Uses --database-url / DATABASE_URL
    when given, else an embedded PostgreSQL (pip install 'sqla-graphile[demo]'). On a
    given database it removes what it created afterwards, even when it fails.
    """
    from .demo import DemoError, run_demo

    url = state.url() if state.database_url else None
    try:
        result = run_demo(
            url,
            schema=state.schema,
            out=sys.stderr if state.as_json else sys.stdout,
            timeout=timeout.total_seconds(),
        )
    except DemoError as exc:
        raise _Failure(str(exc)) from exc
    if state.as_json:
        click.echo(json.dumps(_to_jsonable(result), ensure_ascii=False))
    if not result.ok:
        raise _Failure(
            f"the demo's jobs did not all complete within {timeout.total_seconds():g} s "
            f"({result.jobs_left} left)"
        )


def load_tasks(spec: str) -> list[Any]:
    """Import task handlers from ``module`` or ``module:attribute``.

    A module contributes its ``tasks`` list if it has one, else every ``TaskHandler`` /
    ``BatchTaskHandler`` subclass and ``@task`` function defined in it; an attribute may
    be one handler or a list of them. A module that cannot be imported (whatever it
    raises) is a usage error of ``--tasks``.
    """
    from .tasks import BatchTaskHandler, FunctionTask, TaskHandler

    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the application's module: any error of it is the user's
        detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise click.BadParameter(
            f"cannot import {module_name!r}: {detail}", param_hint="--tasks"
        ) from exc
    if attribute:
        try:
            found = getattr(module, attribute)
        except AttributeError:
            raise click.BadParameter(
                f"{module_name!r} has no attribute {attribute!r}", param_hint="--tasks"
            ) from None
        return list(found) if isinstance(found, (list, tuple)) else [found]
    if isinstance(getattr(module, "tasks", None), (list, tuple)):
        return list(module.tasks)
    handlers: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, FunctionTask) or (
            isinstance(value, type)
            and issubclass(value, (TaskHandler, BatchTaskHandler))
            and value not in (TaskHandler, BatchTaskHandler)
            and isinstance(getattr(value, "IDENTIFIER", None), str)
            and value.__module__ == module.__name__
        ):
            handlers.append(value)
    if not handlers:
        raise click.BadParameter(f"{module_name!r} defines no task handlers", param_hint="--tasks")
    return handlers


if __name__ == "__main__":  # pragma: no cover
    main()
