"""Commands that run workers: ``run`` and ``demo``.

``run`` runs one worker, or ``--processes N`` of them under a supervisor; the handlers of
``--tasks`` are loaded here, in the command's process and in each worker process.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._format import to_jsonable
from .._urls import redact, url_secrets
from ..health import DEFAULT_HEALTH_HOST
from ..recovery import WorkerRecoveryConfig
from .app import State, emit, main, pass_state
from .errors import Error, Failure, Reported, render
from .params import DURATION, NAME, POSITIVE_DURATION

if TYPE_CHECKING:
    from ..supervisor import WorkerSlot
    from ..worker import Worker

__all__ = ["demo", "load_tasks", "run"]


class _RedactingFormatter(logging.Formatter):
    """A log formatter that hides the database URL's secrets."""

    def __init__(self, fmt: str, secrets: frozenset[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


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
    "--overtime-limit",
    envvar="GRAPHILE_WORKER_OVERTIME_LIMIT",
    show_envvar=True,
    type=POSITIVE_DURATION,
    help="How long a def handler may run on past its job's time limit before it counts as "
    "stuck; with --processes its process is then recycled (30s).",
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
@pass_state
def run(
    state: State,
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
    overtime_limit: timedelta | None,
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
    from ..cron import CrontabError
    from ..hooks import Hooks
    from ..progress import Progress
    from ..worker import Worker
    from ..worker.tasks import TaskRegistry

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
    if overtime_limit is not None:
        options["overtime_limit"] = overtime_limit.total_seconds()
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
    emit(
        state,
        {
            "completed": progress.completed,
            "failed": progress.failed,
            "permanently_failed": progress.permanently_failed,
        },
        f"Worker stopped: {progress.line()}.",
    )


def _health_socket_error(host: str, port: int, exc: OSError) -> Failure:
    return Failure(f"cannot serve the health endpoint on {host}:{port}: {exc.strerror or exc}")


def _serve_health(worker: Any, port: int, host: str) -> None:
    from ..health import serve_health

    try:
        serve_health(worker, port, host)
    except OSError as exc:
        raise _health_socket_error(host, port, exc) from exc


def _run_processes(
    state: State,
    url: str,
    tasks_spec: str,
    options: dict[str, Any],
    processes: int,
    progress: Any,
    health_port: int | None,
    health_host: str,
) -> None:
    """``run --processes N``: a supervisor of N worker processes (see ``supervisor``)."""
    from ..errors import SchemaNotMigrated
    from ..migrations import check_database
    from ..supervisor import EXIT_BREAKING_MIGRATION, Supervisor

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
        error = Error(
            f"the worker schema {state.schema!r} has a breaking migration newer than this "
            "library: upgrade sqla-graphile (the worker processes were stopped)",
            "error",
            EXIT_BREAKING_MIGRATION,
        )
        raise Reported(render(error, as_json=state.as_json, verbose=False, secrets=()), code)
    if code != 0:
        raise Failure(f"the supervisor stopped: {supervisor.failure}")
    emit(
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
@pass_state
def demo(state: State, timeout: timedelta) -> None:
    """Run the main job end to end and show what happened.

    Migrates, writes orders and enqueues their jobs in one transaction (and rolls back
    another), runs a worker until the jobs are done (one fails once and is retried),
    and prints progress and a table of what ran. Uses --database-url / DATABASE_URL
    when given, else an embedded PostgreSQL (pip install 'sqla-graphile[demo]'). On a
    given database it removes what it created afterwards, even when it fails.
    """
    from ..demo import DemoError, run_demo

    url = state.url() if state.database_url else None
    try:
        result = run_demo(
            url,
            schema=state.schema,
            out=sys.stderr if state.as_json else sys.stdout,
            timeout=timeout.total_seconds(),
        )
    except DemoError as exc:
        raise Failure(str(exc)) from exc
    if state.as_json:
        click.echo(json.dumps(to_jsonable(result), ensure_ascii=False))
    if not result.ok:
        raise Failure(
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
    from ..tasks import BatchTaskHandler, FunctionTask, TaskHandler

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


@dataclass(frozen=True)
class _CliWorkers:
    """The factory of ``graphile-worker run --processes``: each worker as ``run`` builds it."""

    url: str
    tasks_spec: str
    options: dict[str, Any]
    verbose: bool = False

    def __call__(self, slot: WorkerSlot) -> Worker:
        from ..worker import Worker

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _RedactingFormatter(
                f"%(asctime)s %(levelname)-7s %(name)s [process {slot.index}]: %(message)s",
                url_secrets(self.url),
            )
        )
        logging.basicConfig(
            level=logging.DEBUG if self.verbose else logging.INFO, handlers=[handler]
        )
        return Worker(self.url, load_tasks(self.tasks_spec), **self.options)
