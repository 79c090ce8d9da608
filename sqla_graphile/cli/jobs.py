"""Commands on jobs.

``add``, ``list``, ``show``, ``complete``, ``fail``, ``reschedule`` and ``remove``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Connection, func, select

from .._admin import JobState, state_of
from .._format import table, to_jsonable, when
from ..functions import worker_functions
from ..job import Job
from ..schema import worker_schema
from ..specs import JobKeyMode, JobSpec
from .app import State, emit, main, pass_state
from .errors import Failure, translated
from .params import JOB_ID, NAME, TIME

__all__ = ["add", "complete", "fail", "list_", "remove", "reschedule", "show"]


def _job_state(job: Job) -> str:
    now = datetime.now(timezone.utc)
    return state_of(job.locked_at, job.attempts, job.max_attempts, job.run_at, now).value


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
                when(j.run_at),
                f"{j.attempts}/{j.max_attempts}",
                j.key,
                j.locked_by,
                (j.last_error or "").splitlines()[0][:60] if j.last_error else None,
            )
            for j in jobs
        ],
    )


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
@pass_state
def add(
    state: State,
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
    emit(state, job, f"Added job {job.id} ({job.task_identifier}), runs at {when(job.run_at)}.")


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
@pass_state
def list_(
    state: State,
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
    emit(state, jobs, _jobs_table(jobs) if jobs else "No jobs.")


def _no_such_jobs(missing: Sequence[int], changed: bool) -> Failure:
    ids = ", ".join(map(str, missing))
    what = f"no job with id {ids}" if len(missing) == 1 else f"no jobs with ids {ids}"
    return Failure(
        what + ("; nothing was changed" if changed else ""), "not_found", missing=list(missing)
    )


@main.command()
@click.argument("job_id", type=JOB_ID)
@pass_state
def show(state: State, job_id: int) -> None:
    """Show one job, with its payload."""
    job = state.utils().get_job(job_id)
    if job is None:
        raise _no_such_jobs([job_id], changed=False)
    fields = to_jsonable(job)
    fields["state"] = _job_state(job)
    emit(state, fields, _job_details(job))


def _job_details(job: Job) -> str:
    """``name  value`` lines for one job; the payload last, as indented JSON."""
    lines: list[tuple[str, Any]] = [
        ("id", job.id),
        ("task", job.task_identifier),
        ("queue", job.queue_name),
        ("state", _job_state(job)),
        ("priority", job.priority),
        ("run at", when(job.run_at)),
        ("attempts", f"{job.attempts}/{job.max_attempts}"),
        ("key", job.key),
        ("revision", job.revision),
        ("flags", ", ".join(sorted(job.flags)) if job.flags else None),
        ("locked by", job.locked_by),
        ("locked at", when(job.locked_at)),
        ("created at", when(job.created_at)),
        ("updated at", when(job.updated_at)),
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
    state: State,
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
    with translated(state.schema), state.engine().begin() as connection:
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
    emit(state, {verb: changed, "skipped": skipped}, human)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@pass_state
def complete(state: State, job_ids: tuple[int, ...]) -> None:
    """Mark jobs complete (delete them); locked jobs are skipped."""

    def act(connection: Connection, ids: list[int]) -> Iterable[int]:
        utils = state.utils().using(connection, savepoint=True)
        return [job.id for job in utils.complete_jobs(ids)]

    _act_on_jobs(state, "completed", job_ids, act)


@main.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@click.option("--reason", help="Stored as last_error.")
@pass_state
def fail(state: State, job_ids: tuple[int, ...], reason: str | None) -> None:
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
@pass_state
def reschedule(
    state: State,
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
@pass_state
def remove(state: State, job_key: str) -> None:
    """Remove the job with JOB_KEY (a running one just stops retrying)."""
    job = state.utils().remove_job(job_key)
    if job is None:
        raise Failure(f"no job with key {job_key!r}", "not_found", missing=[job_key])
    how = "stopped retrying (it is running)" if job.locked_at else "removed"
    emit(state, {"job": job, "removed": job.locked_at is None}, f"Job {job.id} {how}.")
