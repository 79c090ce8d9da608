"""The ``graphile-worker`` command line (also ``python -m sqla_graphile``).

Exit status: 0 on success, 1 on a runtime error (one line on stderr; ``--verbose`` adds
the traceback), 2 on a usage error. ``--json`` prints machine-readable output for every
command. A password in the database URL is never printed.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import re
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ._admin import JobState
from ._urls import engine_from_url, redact_url
from .cron import TIME_UNITS
from .errors import DatabaseNewerThanLibrary, GraphileWorkerError, sqlstate_of
from .job import Job
from .recovery import SweepStaleWorkersOptions, WorkerRecoveryConfig
from .schema import DEFAULT_SCHEMA, validate_schema_name
from .specs import CleanupTask, JobKeyMode, JobSpec, RescheduleJobOptions
from .utils import WorkerUtils

__all__ = ["main", "parse_duration", "parse_time"]

_F = TypeVar("_F", bound=Callable[..., Any])

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
# Node's time-phrase units, plus milliseconds and fractions for operators' convenience.
_UNITS = {"ms": timedelta(milliseconds=1), **TIME_UNITS}


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``5m``, ``1h30m``, ``250ms`` or plain seconds (``90``)."""
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return timedelta(seconds=float(value))
    if not value or _DURATION_PART.sub("", value) != "":
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 1h30m)")
    total = timedelta(0)
    for amount, unit in _DURATION_PART.findall(value):
        total += float(amount) * _UNITS[unit]
    return total


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

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Time(click.ParamType):  # type: ignore[type-arg]
    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()
TIME = _Time()


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
        return self.database_url

    def utils(self) -> WorkerUtils:
        if self._utils is None:
            try:
                self._engine = engine_from_url(self.url())
            except ArgumentError:
                raise click.UsageError(
                    f"--database-url is not a database URL: {redact_url(self.url())}"
                ) from None
            self._utils = WorkerUtils(self._engine, self.schema)
        return self._utils

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = self._utils = None


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


#: Exit status of ``run`` stopped by a breaking migration newer than this library (Node's).
EXIT_BREAKING_MIGRATION = 57


def _fail(state: _State | None, message: str, exc: BaseException | None = None) -> NoReturn:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if state is not None and state.database_url:
        message = _redact(message, state.database_url)
    if state is not None and state.verbose and exc is not None:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        click.echo(_redact(trace, state.database_url or ""), err=True)
    click.echo(f"error: {message}", err=True)
    # Node's status for a schema too new: supervisors restart the worker (after upgrading).
    sys.exit(EXIT_BREAKING_MIGRATION if isinstance(exc, DatabaseNewerThanLibrary) else 1)


def _redact(text: str, url: str) -> str:
    """Hide the URL's password in ``text``, as typed (percent-encoded) and decoded."""
    try:
        password = make_url(url).password
    except Exception:
        return text
    if password:
        secret = str(password)
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}:
            text = text.replace(form, "***")
    return text


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _is_connection_error(exc: OperationalError) -> bool:
    """Whether the database could not be reached (as opposed to a failed statement).

    Connection failures carry no SQLSTATE, or one of the connection (08), authentication
    (28) or server-shutdown (57P) classes; a statement timeout or a lock timeout is an
    operational error too, but of a reachable database.
    """
    if exc.connection_invalidated:
        return True
    state = sqlstate_of(exc)
    return state is None or state.startswith(("08", "28", "57P"))


class _Group(click.Group):
    """Turns library and database errors into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (GraphileWorkerError, ValueError, TypeError) as exc:
            _fail(ctx.find_object(_State), str(exc), exc)
        except OperationalError as exc:
            state = ctx.find_object(_State)
            if not _is_connection_error(exc):
                _fail(state, f"database error: {_one_line(exc)}", exc)
            where = redact_url(state.database_url) if state and state.database_url else "?"
            _fail(state, f"cannot reach the database at {where}: {_one_line(exc)}", exc)
        except DBAPIError as exc:
            _fail(ctx.find_object(_State), f"database error: {_one_line(exc)}", exc)
        except Exception as exc:  # anything else is still one line, unless --verbose
            _fail(ctx.find_object(_State), f"{type(exc).__name__}: {_one_line(exc)}", exc)
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
        callback=_json_after_command,
        help="Machine-readable JSON output (same as the global --json).",
    )
    return with_json(click.pass_obj(fn))  # type: ignore[return-value]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="PostgreSQL URL (default: $DATABASE_URL).",
)
@click.option(
    "--schema",
    envvar="GRAPHILE_WORKER_SCHEMA",
    default=DEFAULT_SCHEMA,
    show_default=True,
    help="Worker schema (also $GRAPHILE_WORKER_SCHEMA).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
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


@main.command()
@_pass_state
def migrate(state: _State) -> None:
    """Create or update the worker schema (Node graphile-worker 0.18's)."""
    state.utils().migrate()
    _emit(
        state, {"migrated": True, "schema": state.schema}, f"Schema {state.schema!r} is up to date."
    )


@main.command()
@click.argument("identifier")
@click.option("--payload", metavar="JSON", help="JSON payload (default {}).")
@click.option("--payload-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--queue", "queue_name", help="Named queue (its jobs run one at a time).")
@click.option("--run-at", type=TIME, help="RFC 3339 time or 'now'.")
@click.option("--max-attempts", type=click.IntRange(min=1))
@click.option("--key", "job_key", help="Job key (deduplicates).")
@click.option("--job-key-mode", type=click.Choice([m.value for m in JobKeyMode]))
@click.option("--priority", type=int, help="Lower runs first.")
@click.option("--flag", "flags", multiple=True, help="A flag (repeatable).")
@_pass_state
def add(
    state: _State,
    identifier: str,
    payload: str | None,
    payload_file: Path | None,
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
    source = payload
    if payload_file is not None:
        try:
            source = payload_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(str(exc), param_hint="--payload-file") from None
    try:
        value = json.loads(source) if source is not None else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"not valid JSON: {exc}", param_hint="--payload-file" if payload_file else "--payload"
        ) from None
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
@click.option("--task", "task_identifier", help="Only jobs of this task.")
@click.option("--queue", "queue_name", help="Only jobs of this queue.")
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


@main.command()
@click.argument("job_id", type=int)
@_pass_state
def show(state: _State, job_id: int) -> None:
    """Show one job, with its payload."""
    job = state.utils().get_job(job_id)
    if job is None:
        _fail(state, f"no job with id {job_id}")
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


def _ids_result(state: _State, verb: str, asked: Sequence[int], jobs: list[Job]) -> None:
    done = {j.id for j in jobs}
    skipped = [i for i in asked if i not in done]
    data = {verb: [j.id for j in jobs], "skipped": skipped}
    human = f"{verb.capitalize()} {len(jobs)} job(s): {', '.join(map(str, sorted(done))) or '-'}."
    if skipped:
        human += f"\nSkipped (locked or missing): {', '.join(map(str, skipped))}."
    _emit(state, data, human)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=int)
@_pass_state
def complete(state: _State, job_ids: tuple[int, ...]) -> None:
    """Mark jobs complete (delete them); locked jobs are skipped."""
    _ids_result(state, "completed", job_ids, state.utils().complete_jobs(job_ids))


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=int)
@click.option("--reason", help="Stored as last_error.")
@_pass_state
def fail(state: _State, job_ids: tuple[int, ...], reason: str | None) -> None:
    """Fail jobs permanently; locked jobs are skipped."""
    _ids_result(state, "failed", job_ids, state.utils().permanently_fail_jobs(job_ids, reason))


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=int)
@click.option("--run-at", type=TIME, help="RFC 3339 time or 'now'.")
@click.option("--now", "run_now", is_flag=True, help="Run as soon as possible.")
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
    """Change run time, priority or attempts of jobs (runnable now unless --run-at)."""
    if run_at is not None and run_now:
        raise click.UsageError("give --run-at or --now, not both")
    options = RescheduleJobOptions(
        run_at=run_at, priority=priority, attempts=attempts, max_attempts=max_attempts
    )
    _ids_result(state, "rescheduled", job_ids, state.utils().reschedule_jobs(job_ids, options))


@main.command()
@click.argument("job_key")
@_pass_state
def remove(state: _State, job_key: str) -> None:
    """Remove the job with JOB_KEY (a running one just stops retrying)."""
    job = state.utils().remove_job(job_key)
    if job is None:
        _fail(state, f"no job with key {job_key!r}")
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
@click.argument("worker_ids", nargs=-1, required=True)
@_pass_state
def force_unlock(state: _State, worker_ids: tuple[str, ...]) -> None:
    """Release every job and queue lock of WORKER_IDS.

    Only for workers known to be dead: a live worker's job would run twice at once.
    """
    state.utils().force_unlock_workers(worker_ids)
    _emit(
        state,
        {"unlocked_worker_ids": list(worker_ids)},
        f"Released the locks of {len(worker_ids)} worker id(s).",
    )


@main.command("sweep-stale-workers")
@click.option("--sweep-threshold", type=DURATION, help="Heartbeat age of a dead worker (5m).")
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
    "--tasks",
    "tasks_spec",
    required=True,
    metavar="MODULE[:ATTR]",
    help="Importable module (or module:attribute) holding the task handlers.",
)
@click.option(
    "--crontab",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Crontab file in Node graphile-worker's format.",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--poll-interval", type=DURATION, default="2s", show_default=True)
@click.option(
    "--local-queue-size",
    type=click.IntRange(min=0),
    help="Jobs fetched ahead per fetch (default: max(100, 4 x concurrency); 0: none).",
)
@click.option(
    "--complete-batch-delay",
    type=DURATION,
    help="Collect completions/failures this long before writing them (default 0).",
)
@click.option("--once", is_flag=True, help="Run until no job is runnable, then exit.")
@click.option(
    "--recovery/--no-recovery",
    default=None,
    help="Register, heartbeat and sweep dead workers' jobs (crash recovery; default: on "
    "when the schema has the worker registry, as every schema this library migrated).",
)
@click.option(
    "--statement-timeout",
    type=DURATION,
    help="Time limit of each worker statement; past it the link is cut and retried (30s).",
)
@click.option(
    "--job-timeout",
    type=DURATION,
    help="Time limit of each job whose task sets no timeout; past it the job fails (none).",
)
@click.option("--progress-interval", type=DURATION, default="5s", show_default=True)
@_pass_state
def run(
    state: _State,
    tasks_spec: str,
    crontab: Path | None,
    concurrency: int,
    poll_interval: timedelta,
    local_queue_size: int | None,
    complete_batch_delay: timedelta | None,
    once: bool,
    recovery: bool | None,
    statement_timeout: timedelta | None,
    job_timeout: timedelta | None,
    progress_interval: timedelta,
) -> None:
    """Start a worker for the handlers in --tasks (SIGINT/SIGTERM stop it gracefully)."""
    import logging
    import sys as _sys

    from .cron import CrontabError
    from .hooks import Hooks
    from .progress import Progress
    from .worker import Worker

    if str(Path.cwd()) not in _sys.path:
        # Task modules are usually the application's own, next to where it is run.
        _sys.path.insert(0, str(Path.cwd()))
    handlers = load_tasks(tasks_spec)
    logging.basicConfig(
        level=logging.DEBUG if state.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=_sys.stderr,
    )
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
    try:
        worker = Worker(
            state.url(),
            handlers,
            schema=state.schema,
            concurrency=concurrency,
            poll_interval=poll_interval.total_seconds(),
            hooks=hooks,
            crontab=crontab,
            job_timeout=job_timeout,
            **options,
        )
    except CrontabError as exc:
        raise click.BadParameter(str(exc), param_hint="--crontab") from None
    progress.start()
    try:
        worker.run_once() if once else worker.run()
    finally:
        progress.stop()
        worker.close()
    _emit(
        state,
        {
            "completed": progress.completed,
            "failed": progress.failed,
            "permanently_failed": progress.permanently_failed,
        },
        f"Worker stopped: {progress.line()}.",
    )


@main.command()
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Give up if the jobs are not done by then.",
)
@_pass_state
def demo(state: _State, timeout: timedelta) -> None:
    """Run the main job end to end and show what happened.

    Migrates, writes orders and enqueues their jobs in one transaction (and rolls back
    another), runs a worker until the jobs are done (one fails once and is retried),
    and prints progress and a table of what ran. Uses --database-url / DATABASE_URL
    when given, else an embedded PostgreSQL (pip install 'sqla-graphile[demo]').
    """
    from .demo import DemoError, run_demo

    try:
        result = run_demo(
            state.database_url,
            schema=state.schema,
            out=sys.stderr if state.as_json else sys.stdout,
            timeout=timeout.total_seconds(),
        )
    except DemoError as exc:
        _fail(state, str(exc), exc)
    if state.as_json:
        click.echo(json.dumps(_to_jsonable(result), ensure_ascii=False))
    if not result.ok:
        _fail(state, "the demo's jobs did not all complete")


def load_tasks(spec: str) -> list[Any]:
    """Import task handlers from ``module`` or ``module:attribute``.

    A module contributes its ``tasks`` list if it has one, else every ``TaskHandler`` /
    ``BatchTaskHandler`` subclass and ``@task`` function defined in it; an attribute may
    be one handler or a list of them.
    """
    from .tasks import BatchTaskHandler, FunctionTask, TaskHandler

    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="--tasks"
        ) from None
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
