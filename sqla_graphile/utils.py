"""``WorkerUtils`` and ``AsyncWorkerUtils``: job management inside the caller's transaction.

Bound to an ``Engine`` (or a URL) each call is its own committed transaction; bound to a
``Connection`` or ORM ``Session`` every call joins the caller's transaction, and the
library never commits, rolls back or closes it::

    with Session(engine) as session, session.begin():
        session.add(Order(...))
        WorkerUtils(session).add_job(SendEmail(to="a@example.com"))
    # the order and its job commit (or roll back) together

Both twins drive the same operations (:mod:`sqla_graphile._ops`, run by
:mod:`sqla_graphile._drive`): one piece of SQL and logic per operation, two ways of
executing it.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from ._admin import get_job_op, list_jobs_op, lock_holders_op, stats_op
from ._checks import check_raw_jobs, check_spec, typed_identifier
from ._drive import Op, Request, drive, first_request
from ._ops import NameCache, Operations
from ._urls import async_engine_from_url, engine_from_url
from .admin import JobState, LockHolder, WorkerStats
from .errors import InvalidArgumentType, translate_db_error
from .hooks import Hooks, JobAddContext
from .job import Job
from .recovery import (
    ActiveWorker,
    SweepResult,
    SweepStaleWorkersOptions,
    WorkerRecoveryConfig,
    list_active_workers_op,
    sweep_op,
)
from .schema import DEFAULT_SCHEMA, validate_schema_name
from .specs import CleanupTask, JobSpec, RawJobSpec, RescheduleJobOptions
from .tasks import TaskHandler, batch_spec, typed_jobs, with_task_defaults

__all__ = ["AsyncWorkerUtils", "WorkerUtils"]

_DEFAULT_THRESHOLD = WorkerRecoveryConfig().sweep_threshold

_T = TypeVar("_T")
_Bind = TypeVar("_Bind")
_U = TypeVar("_U", bound="_UtilsBase[Any]")


def _typed_jobs(jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> list[RawJobSpec]:
    """Typed (task, spec) pairs, misuse named, as raw jobs completed with task defaults."""
    checked: list[tuple[TaskHandler, JobSpec | None]] = []
    for pair in jobs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise InvalidArgumentType(
                f"add_jobs takes (task, spec) pairs, not {type(pair).__name__}: write "
                "add_jobs([(task, None), (task, JobSpec(...))])"
            )
        instance, spec = pair
        typed_identifier(instance, "add_jobs")
        checked.append((instance, check_spec(spec, "add_jobs")))
    return typed_jobs(checked)


def _drive_on(bind: Connection | Session, op: Op[_T], request: Request) -> _T:
    """:func:`drive` on a sync ``Connection`` or ``Session``, e.g. inside ``run_sync``.

    A Session emits its SAVEPOINT lazily, on the first connection asked for inside
    ``begin_nested()``: the connection is fetched here, within it.
    """
    return drive(bind.connection() if isinstance(bind, Session) else bind, op, request)


async def _run_sync(bind: AsyncConnection | AsyncSession, op: Op[_T], request: Request) -> _T:
    return await bind.run_sync(_drive_on, op, request)


def _options(options: RescheduleJobOptions | None) -> RescheduleJobOptions:
    return RescheduleJobOptions() if options is None else options


class _UtilsBase(Generic[_Bind]):
    """What both twins share: binding, options, caches, error translation."""

    #: The kinds of bind this twin accepts, and the twin to use for the others.
    _BIND_TYPES: ClassVar[tuple[type, ...]]
    _OTHER_TWIN: ClassVar[str]

    def __init__(
        self,
        bind: _Bind | str,
        schema: str = DEFAULT_SCHEMA,
        *,
        hooks: Hooks | None = None,
        savepoint: bool = False,
        known_identifiers: Collection[str] = (),
        _names: NameCache | None = None,
    ) -> None:
        self._owned_engine: Any = None
        if isinstance(bind, str):
            bind = self._owned_engine = self._engine_from_url(bind)
        if not isinstance(bind, self._BIND_TYPES):
            kinds = ", ".join(kind.__name__ for kind in self._BIND_TYPES)
            raise InvalidArgumentType(
                f"{type(self).__name__} needs one of {kinds} or a URL; "
                f"for {type(bind).__name__} use {self._OTHER_TWIN}"
            )
        self.bind: _Bind = cast("_Bind", bind)
        self.schema = validate_schema_name(schema)
        self.hooks = hooks
        self.savepoint = savepoint
        self.known_identifiers = frozenset(known_identifiers)
        self._names = _names or NameCache()
        self.ops = Operations(self.schema, hooks, self._names, self.known_identifiers)

    @staticmethod
    def _engine_from_url(url: str) -> Any:
        raise NotImplementedError

    def using(self: _U, bind: _Bind, *, savepoint: bool | None = None) -> _U:
        """The same utils (schema, hooks, caches) bound to ``bind``, e.g. a request's session."""
        if not isinstance(bind, self._BIND_TYPES):  # a URL, or misuse: as the constructor
            return type(self)(
                bind,
                self.schema,
                hooks=self.hooks,
                savepoint=self.savepoint if savepoint is None else savepoint,
                known_identifiers=self.known_identifiers,
                _names=self._names,
            )
        # Called per request or per transaction: a shallow copy shares the operations.
        bound = copy.copy(self)
        bound.bind = bind
        bound._owned_engine = None
        if savepoint is not None:
            bound.savepoint = savepoint
        return bound

    def _wraps_adds(self) -> bool:
        """Whether ``job_add_context`` hooks wrap add calls (they are given the jobs)."""
        return self.hooks is not None and bool(self.hooks.job_add_context_hooks)

    def _add_context(self, operation: str | None) -> JobAddContext | None:
        """The context of an add call when ``job_add_context`` hooks are registered."""
        if operation is None or not self._wraps_adds():
            return None
        return JobAddContext(operation, self.schema)

    @staticmethod
    def _added(ctx: JobAddContext, result: Any) -> None:
        ctx.jobs.extend(result if isinstance(result, list) else [result])

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Re-raise database errors as the library's named exceptions where one fits."""
        try:
            yield
        except (DBAPIError, UnicodeEncodeError) as exc:
            in_transaction = not self.savepoint and not isinstance(self.bind, (Engine, AsyncEngine))
            translated = translate_db_error(exc, schema=self.schema, in_transaction=in_transaction)
            if translated is None:
                raise
            raise translated from exc


class WorkerUtils(_UtilsBase[Engine | Connection | Session]):
    """Job management on a sync ``Engine``, ``Connection``, ``Session`` or URL.

    ``schema`` names the worker schema (``graphile_worker``); ``hooks`` brings
    ``before_job_schedule`` interceptors; ``savepoint=True`` wraps each call made inside
    a caller's transaction in a SAVEPOINT, so a refused job leaves the caller's other
    writes intact.
    """

    _BIND_TYPES = (Engine, Connection, Session)
    _OTHER_TWIN = "AsyncWorkerUtils"

    @staticmethod
    def _engine_from_url(url: str) -> Engine:
        return engine_from_url(url)

    def close(self) -> None:
        """Dispose of the engine this utils created from a URL (nothing otherwise)."""
        if self._owned_engine is not None:
            self._owned_engine.dispose()

    def __enter__(self) -> WorkerUtils:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        bind = self.bind
        if isinstance(bind, Engine):
            with bind.begin() as connection:
                yield connection
            return
        nested: AbstractContextManager[Any] = (
            bind.begin_nested() if self.savepoint else nullcontext()
        )
        with nested:
            # A Session emits its SAVEPOINT lazily, on the first connection asked for
            # inside begin_nested(): the connection must be fetched within it.
            yield bind.connection() if isinstance(bind, Session) else bind

    def _run(self, op: Op[_T], adding: str | None = None) -> _T:
        """Run ``op``; ``adding`` names an add call (its ``job_add_context`` hooks wrap it)."""
        ctx = self._add_context(adding)
        if ctx is not None:
            assert self.hooks is not None
            with self.hooks.add_scope(ctx):
                result = self._run(op)
                self._added(ctx, result)
            return result
        request, value = first_request(op)
        if request is None:  # answered without the database
            return value  # type: ignore[return-value]
        with self._translated(), self._connection() as connection:
            return drive(connection, op, request)

    # -- adding jobs --------------------------------------------------------------

    def add_job(self, task: TaskHandler, spec: JobSpec | None = None) -> Job:
        """Enqueue a typed task: identifier from its class, payload from the instance.

        ``task`` is a ``TaskHandler`` instance and ``spec`` a ``JobSpec``; anything else
        (an identifier string, a dict of options) raises
        :class:`~sqla_graphile.errors.InvalidArgumentType` naming the call that fits.
        Fields ``spec`` leaves unset take the task class's defaults (``QUEUE_NAME`` …).
        """
        identifier = typed_identifier(task, "add_job")
        spec = with_task_defaults(type(task), check_spec(spec, "add_job"))
        return self._run(self.ops.add_job(identifier, task, spec, "add_job"), "add_job")

    def add_raw_job(self, identifier: str, payload: Any = None, spec: JobSpec | None = None) -> Job:
        """Enqueue a job by task identifier with a JSON payload (``None`` means ``{}``).

        No task's defaults apply: only ``spec`` and the database's defaults.
        """
        return self._run(self.ops.add_job(identifier, payload, spec), "add_raw_job")

    def add_jobs(self, jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> list[Job]:
        """Enqueue typed tasks in one statement; ``[]`` without touching the database.

        Each job's unset fields take its task class's defaults, as in :meth:`add_job`.
        """
        return self._run(self.ops.add_jobs(_typed_jobs(jobs)), "add_jobs")

    def add_raw_jobs(self, jobs: Iterable[RawJobSpec]) -> list[Job]:
        """Enqueue jobs of any identifiers in one statement."""
        return self._run(self.ops.add_jobs(check_raw_jobs(jobs)), "add_raw_jobs")

    def bulk_add_jobs(self, jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> int:
        """:meth:`add_jobs`, returning how many jobs were added instead of the jobs.

        The jobs stored, the notification and the hooks are those of :meth:`add_jobs`;
        no ``Job`` is built, which makes large batches cheaper. With ``job_add_context``
        hooks registered the jobs are built for them.
        """
        return self._bulk(_typed_jobs(jobs), "bulk_add_jobs")

    def bulk_add_raw_jobs(self, jobs: Iterable[RawJobSpec]) -> int:
        """:meth:`add_raw_jobs`, returning how many jobs were added instead of the jobs.

        See :meth:`bulk_add_jobs`.
        """
        return self._bulk(check_raw_jobs(jobs), "bulk_add_raw_jobs")

    def _bulk(self, jobs: list[RawJobSpec], operation: str) -> int:
        if self._wraps_adds():
            return len(self._run(self.ops.add_jobs(jobs), operation))
        return self._run(self.ops.add_jobs_counted(jobs))

    def add_batch_job(self, items: list[Any], spec: JobSpec | None = None) -> Job:
        """Enqueue one job whose payload is the JSON array of ``items`` (a batch task's).

        Fields ``spec`` leaves unset take the batch task class's defaults.
        """
        return self._run(
            self.ops.add_batch_job(items, batch_spec(items, check_spec(spec, "add_batch_job"))),
            "add_batch_job",
        )

    # -- administration -----------------------------------------------------------

    def remove_job(self, job_key: str) -> Job | None:
        """Delete the waiting job with this key, or stop a running one from retrying.

        Returns the job, or ``None`` when no job has the key. To delete by id use
        :meth:`complete_jobs`.
        """
        return self._run(self.ops.remove_job(job_key))

    def complete_jobs(self, ids: Iterable[int]) -> list[Job]:
        """Delete these jobs unless locked; return the ones deleted."""
        return self._run(self.ops.complete_jobs(ids))

    def permanently_fail_jobs(self, ids: Iterable[int], reason: str | None = None) -> list[Job]:
        """Mark these jobs failed for good (``attempts = max_attempts``) unless locked."""
        return self._run(self.ops.permanently_fail_jobs(ids, reason))

    def reschedule_jobs(
        self, ids: Iterable[int], options: RescheduleJobOptions | None = None
    ) -> list[Job]:
        """Change run time, priority or attempts of these jobs unless locked.

        See :class:`~sqla_graphile.specs.RescheduleJobOptions`: a ``timedelta`` counts
        from the database's ``now()``, and no ``run_at`` makes the jobs runnable now.
        """
        return self._run(self.ops.reschedule_jobs(ids, _options(options)))

    def force_unlock_workers(self, worker_ids: Iterable[str]) -> None:
        """Release every job and queue lock held by these (dead) workers."""
        self._run(self.ops.force_unlock_workers(worker_ids))

    def cleanup(self, tasks: Iterable[CleanupTask | str] | None = None) -> None:
        """Run maintenance tasks; by default the two garbage collections."""
        self._run(self.ops.cleanup(tasks))

    def list_jobs(
        self,
        state: JobState | str = JobState.ALL,
        *,
        task_identifier: str | None = None,
        queue_name: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs in ``state`` (ready, scheduled, locked, failed, all), with payloads."""
        return self._run(
            list_jobs_op(
                self.schema,
                state=state,
                task_identifier=task_identifier,
                queue_name=queue_name,
                limit=limit,
                offset=offset,
            )
        )

    def get_job(self, job_id: int) -> Job | None:
        """One job by id, or ``None``."""
        return self._run(get_job_op(self.schema, job_id))

    def lock_holders(self) -> list[LockHolder]:
        """Every worker id holding job or queue locks, and whether it heartbeats."""
        return self._run(lock_holders_op(self.schema))

    def stats(self) -> WorkerStats:
        """Job counts by state and per queue, and the oldest ready job's age."""
        return self._run(stats_op(self.schema))

    def list_active_workers(self, threshold: timedelta = _DEFAULT_THRESHOLD) -> list[ActiveWorker]:
        """The registered workers; ``is_stale`` when their heartbeat is older than ``threshold``."""
        return self._run(list_active_workers_op(self.schema, threshold))

    def sweep_stale_workers(self, options: SweepStaleWorkersOptions | None = None) -> SweepResult:
        """Recover the jobs of dead workers, with default recovery settings."""
        return self.sweep_stale_workers_with_config(WorkerRecoveryConfig(), options)

    def sweep_stale_workers_with_config(
        self, config: WorkerRecoveryConfig, options: SweepStaleWorkersOptions | None = None
    ) -> SweepResult:
        """Recover the jobs of dead workers, taking unset options from ``config``."""
        return self._run(sweep_op(self.schema, config, options or SweepStaleWorkersOptions()))

    def migrate(self) -> None:
        """Bring the worker schema up to date (see :func:`sqla_graphile.migrate`)."""
        from .migrations import migrate

        bind = self.bind
        migrate(bind.connection() if isinstance(bind, Session) else bind, schema=self.schema)


class AsyncWorkerUtils(_UtilsBase[AsyncEngine | AsyncConnection | AsyncSession]):
    """The asyncio twin of :class:`WorkerUtils`: same methods, same semantics, awaited.

    It binds to an ``AsyncEngine``, ``AsyncConnection``, ``AsyncSession`` or a URL.
    """

    _BIND_TYPES = (AsyncEngine, AsyncConnection, AsyncSession)
    _OTHER_TWIN = "WorkerUtils"

    @staticmethod
    def _engine_from_url(url: str) -> AsyncEngine:
        return async_engine_from_url(url)

    async def close(self) -> None:
        """Dispose of the engine this utils created from a URL (nothing otherwise)."""
        if self._owned_engine is not None:
            await self._owned_engine.dispose()

    async def __aenter__(self) -> AsyncWorkerUtils:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _drive(self, op: Op[_T], request: Request) -> _T:
        """Run ``op`` on the bind, in one hop into SQLAlchemy's greenlet (``run_sync``).

        One hop for the whole operation, not one per statement (and one more for the
        session's connection): each costs a greenlet switch and event-loop work.
        """
        bind = self.bind
        if isinstance(bind, AsyncEngine):
            async with bind.begin() as connection:
                return await connection.run_sync(_drive_on, op, request)
        if self.savepoint:
            async with bind.begin_nested():
                return await _run_sync(bind, op, request)
        return await _run_sync(bind, op, request)

    async def _run(self, op: Op[_T], adding: str | None = None) -> _T:
        ctx = self._add_context(adding)
        if ctx is not None:
            assert self.hooks is not None
            with self.hooks.add_scope(ctx):
                result = await self._run(op)
                self._added(ctx, result)
            return result
        request, value = first_request(op)
        if request is None:
            return value  # type: ignore[return-value]
        with self._translated():
            return await self._drive(op, request)

    async def add_job(self, task: TaskHandler, spec: JobSpec | None = None) -> Job:
        """See :meth:`WorkerUtils.add_job`."""
        identifier = typed_identifier(task, "add_job")
        spec = with_task_defaults(type(task), check_spec(spec, "add_job"))
        return await self._run(self.ops.add_job(identifier, task, spec, "add_job"), "add_job")

    async def add_raw_job(
        self, identifier: str, payload: Any = None, spec: JobSpec | None = None
    ) -> Job:
        """See :meth:`WorkerUtils.add_raw_job`."""
        return await self._run(self.ops.add_job(identifier, payload, spec), "add_raw_job")

    async def add_jobs(self, jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> list[Job]:
        """See :meth:`WorkerUtils.add_jobs`."""
        return await self._run(self.ops.add_jobs(_typed_jobs(jobs)), "add_jobs")

    async def add_raw_jobs(self, jobs: Iterable[RawJobSpec]) -> list[Job]:
        """See :meth:`WorkerUtils.add_raw_jobs`."""
        return await self._run(self.ops.add_jobs(check_raw_jobs(jobs)), "add_raw_jobs")

    async def bulk_add_jobs(self, jobs: Iterable[tuple[TaskHandler, JobSpec | None]]) -> int:
        """See :meth:`WorkerUtils.bulk_add_jobs`."""
        return await self._bulk(_typed_jobs(jobs), "bulk_add_jobs")

    async def bulk_add_raw_jobs(self, jobs: Iterable[RawJobSpec]) -> int:
        """See :meth:`WorkerUtils.bulk_add_raw_jobs`."""
        return await self._bulk(check_raw_jobs(jobs), "bulk_add_raw_jobs")

    async def _bulk(self, jobs: list[RawJobSpec], operation: str) -> int:
        if self._wraps_adds():
            return len(await self._run(self.ops.add_jobs(jobs), operation))
        return await self._run(self.ops.add_jobs_counted(jobs))

    async def add_batch_job(self, items: list[Any], spec: JobSpec | None = None) -> Job:
        """See :meth:`WorkerUtils.add_batch_job`."""
        return await self._run(
            self.ops.add_batch_job(items, batch_spec(items, check_spec(spec, "add_batch_job"))),
            "add_batch_job",
        )

    async def remove_job(self, job_key: str) -> Job | None:
        """See :meth:`WorkerUtils.remove_job`."""
        return await self._run(self.ops.remove_job(job_key))

    async def complete_jobs(self, ids: Iterable[int]) -> list[Job]:
        """See :meth:`WorkerUtils.complete_jobs`."""
        return await self._run(self.ops.complete_jobs(ids))

    async def permanently_fail_jobs(
        self, ids: Iterable[int], reason: str | None = None
    ) -> list[Job]:
        """See :meth:`WorkerUtils.permanently_fail_jobs`."""
        return await self._run(self.ops.permanently_fail_jobs(ids, reason))

    async def reschedule_jobs(
        self, ids: Iterable[int], options: RescheduleJobOptions | None = None
    ) -> list[Job]:
        """See :meth:`WorkerUtils.reschedule_jobs`."""
        return await self._run(self.ops.reschedule_jobs(ids, _options(options)))

    async def force_unlock_workers(self, worker_ids: Iterable[str]) -> None:
        """See :meth:`WorkerUtils.force_unlock_workers`."""
        await self._run(self.ops.force_unlock_workers(worker_ids))

    async def cleanup(self, tasks: Iterable[CleanupTask | str] | None = None) -> None:
        """See :meth:`WorkerUtils.cleanup`."""
        await self._run(self.ops.cleanup(tasks))

    async def list_jobs(
        self,
        state: JobState | str = JobState.ALL,
        *,
        task_identifier: str | None = None,
        queue_name: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[Job]:
        """See :meth:`WorkerUtils.list_jobs`."""
        return await self._run(
            list_jobs_op(
                self.schema,
                state=state,
                task_identifier=task_identifier,
                queue_name=queue_name,
                limit=limit,
                offset=offset,
            )
        )

    async def get_job(self, job_id: int) -> Job | None:
        """See :meth:`WorkerUtils.get_job`."""
        return await self._run(get_job_op(self.schema, job_id))

    async def lock_holders(self) -> list[LockHolder]:
        """See :meth:`WorkerUtils.lock_holders`."""
        return await self._run(lock_holders_op(self.schema))

    async def stats(self) -> WorkerStats:
        """See :meth:`WorkerUtils.stats`."""
        return await self._run(stats_op(self.schema))

    async def list_active_workers(
        self, threshold: timedelta = _DEFAULT_THRESHOLD
    ) -> list[ActiveWorker]:
        """See :meth:`WorkerUtils.list_active_workers`."""
        return await self._run(list_active_workers_op(self.schema, threshold))

    async def sweep_stale_workers(
        self, options: SweepStaleWorkersOptions | None = None
    ) -> SweepResult:
        """See :meth:`WorkerUtils.sweep_stale_workers`."""
        return await self.sweep_stale_workers_with_config(WorkerRecoveryConfig(), options)

    async def sweep_stale_workers_with_config(
        self, config: WorkerRecoveryConfig, options: SweepStaleWorkersOptions | None = None
    ) -> SweepResult:
        """See :meth:`WorkerUtils.sweep_stale_workers_with_config`."""
        return await self._run(sweep_op(self.schema, config, options or SweepStaleWorkersOptions()))

    async def migrate(self) -> None:
        """See :meth:`WorkerUtils.migrate`."""
        from .migrations import migration_lock, run_migrations

        bind = self.bind
        schema = self.schema
        async with migration_lock.held_async():
            if isinstance(bind, AsyncEngine):
                async with bind.connect() as connection:
                    await connection.run_sync(lambda sync: run_migrations(sync, schema))
                return
            connection = await bind.connection() if isinstance(bind, AsyncSession) else bind
            await connection.run_sync(lambda sync: run_migrations(sync, schema))
