"""Commands on the schema, the queue and the workers.

``migrate``, ``cleanup``, ``force-unlock``, ``sweep-stale-workers``, ``workers``,
``stats`` and ``health``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime, timedelta, timezone

import click
from sqlalchemy import Engine, func, select
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table

from .._format import age, table, to_jsonable, when
from .._urls import redact, url_secrets
from ..recovery import SweepStaleWorkersOptions, WorkerRecoveryConfig
from ..schema import quote_schema, worker_schema
from ..specs import CleanupTask
from .app import State, emit, main, pass_state
from .errors import Failure, translated
from .params import DURATION, NAME, POSITIVE_DURATION

__all__ = [
    "cleanup",
    "force_unlock",
    "health",
    "migrate",
    "stats",
    "sweep_stale_workers",
    "workers",
]


@dataclasses.dataclass(frozen=True)
class _SchemaVersion:
    migration: int | None  # Graphile Worker's ledger: its highest migration
    revisions: tuple[str, ...]  # this library's Alembic revisions (heads) applied


def _schema_version(engine: Engine, schema: str) -> _SchemaVersion:
    from ..migrations import VERSION_TABLE, read_ledger

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

    from ..migrations import alembic_config

    if before.revisions == after.revisions:
        return []
    script = ScriptDirectory.from_config(alembic_config(schema))
    try:
        between = script.iterate_revisions(after.revisions, before.revisions or "base")
        return [revision.revision for revision in reversed(list(between))]
    except Exception:  # a revision this library does not know: say what is certain
        return [revision for revision in after.revisions if revision not in before.revisions]


@main.command()
@pass_state
def migrate(state: State) -> None:
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
    emit(state, data, human)


_CLEANUP_NAMES = {t.value.lower().replace("_", "-"): t for t in CleanupTask}


@main.command()
@click.argument("tasks", nargs=-1)
@pass_state
def cleanup(state: State, tasks: tuple[str, ...]) -> None:
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
    emit(state, {"ran": [t.value for t in run]}, f"Ran {', '.join(names)}.")


@main.command("force-unlock")
@click.argument("worker_ids", nargs=-1, required=True, type=NAME)
@pass_state
def force_unlock(state: State, worker_ids: tuple[str, ...]) -> None:
    """Release every job and queue lock of WORKER_IDS.

    Only for workers known to be dead: a live worker's job would run twice at once.
    Every worker id must hold a lock; if one holds none, nothing is released.
    """
    ids = list(dict.fromkeys(worker_ids))
    schema = worker_schema(state.schema)
    with translated(state.schema), state.engine().begin() as connection:
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
            raise Failure(f"{which} no lock; nothing was released", "not_found", missing=missing)
        state.utils().using(connection, savepoint=True).force_unlock_workers(ids)
    jobs, queues = sum(held_jobs.values()), sum(held_queues.values())
    emit(
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
@pass_state
def sweep_stale_workers(
    state: State,
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
    emit(state, {**to_jsonable(result), "recovered_count": result.recovered_count}, human)


@main.command()
@click.option("--threshold", type=DURATION, default="5m", show_default=True)
@pass_state
def workers(state: State, threshold: timedelta) -> None:
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
                    when(w.started_at),
                    age(w.heartbeat_age),
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
                    age(now - h.oldest_lock_at),
                    age(now - h.last_heartbeat_at)
                    if h.registered and h.last_heartbeat_at is not None
                    else "never (unregistered: 4-hour lock expiry applies)",
                )
                for h in holders
            ],
        )
        if holders
        else "  none"
    )
    emit(state, {"registered": registered, "lock_holders": holders}, human)


@main.command()
@pass_state
def stats(state: State) -> None:
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
                age(result.oldest_ready_age),
            )
        ],
    )
    if result.queues:
        human += "\n\n" + table(
            ["QUEUE", "JOBS", "LOCKED BY"],
            [(q.queue_name, q.jobs, q.locked_by) for q in result.queues],
        )
    emit(state, result, human)


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
@pass_state
def health(
    state: State, worker_ids: tuple[str, ...], min_workers: int, threshold: timedelta
) -> None:
    """Check the database for workers: exit 0 when healthy, 1 when not.

    Checks that the database is reachable and that the worker schema is migrated and not
    newer than this library; with --worker-id or --min-workers, that workers heartbeat.
    Each check is printed (JSON: "healthy" and "checks"), failed ones too.
    """
    from ..health import check_health

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
    emit(state, {"healthy": report.healthy, "checks": checks}, human)
    if not report.healthy:
        raise click.exceptions.Exit(1)
