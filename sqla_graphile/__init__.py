"""sqla-graphile: Graphile Worker's PostgreSQL job queue for SQLAlchemy applications."""

from __future__ import annotations

from ._version import __version__
from .context import CancellationSignal, WorkerContext
from .cron import Cron, CronScheduler, CrontabError, load_crontab, parse_crontab
from .errors import (
    DatabaseNewerThanLibrary,
    GraphileWorkerError,
    InvalidJobKeyMode,
    InvalidSchemaName,
    JobScheduleFailed,
    JobScheduleSkipped,
    JobTimedOut,
    MigrationError,
    NotSchemaOwner,
    PayloadNotSerializable,
    SchemaNotMigrated,
)
from .hooks import (
    AfterJobRunContext,
    BeforeJobRunContext,
    BeforeJobScheduleContext,
    Continue,
    Fail,
    Hooks,
    JobCompleteEvent,
    JobEvent,
    JobFailEvent,
    JobLockLostEvent,
    Skip,
    WorkerFenceEvent,
    WorkerRecoveredEvent,
    WorkerStartEvent,
    WorkerStopEvent,
)
from .job import Job
from .migrations import migrate
from .recovery import ActiveWorker, SweepResult, SweepStaleWorkersOptions, WorkerRecoveryConfig
from .schema import DEFAULT_SCHEMA, WorkerSchema, worker_schema
from .specs import CleanupTask, JobKeyMode, JobSpec, RawJobSpec, RescheduleJobOptions
from .tasks import BatchTaskHandler, FunctionTask, TaskHandler, task
from .utils import AsyncWorkerUtils, WorkerUtils
from .worker import Worker

__all__ = [
    "DEFAULT_SCHEMA",
    "ActiveWorker",
    "AfterJobRunContext",
    "AsyncWorkerUtils",
    "BatchTaskHandler",
    "BeforeJobRunContext",
    "BeforeJobScheduleContext",
    "CancellationSignal",
    "CleanupTask",
    "Continue",
    "Cron",
    "CronScheduler",
    "CrontabError",
    "DatabaseNewerThanLibrary",
    "Fail",
    "FunctionTask",
    "GraphileWorkerError",
    "Hooks",
    "InvalidJobKeyMode",
    "InvalidSchemaName",
    "Job",
    "JobCompleteEvent",
    "JobEvent",
    "JobFailEvent",
    "JobKeyMode",
    "JobLockLostEvent",
    "JobScheduleFailed",
    "JobScheduleSkipped",
    "JobSpec",
    "JobTimedOut",
    "MigrationError",
    "NotSchemaOwner",
    "PayloadNotSerializable",
    "RawJobSpec",
    "RescheduleJobOptions",
    "SchemaNotMigrated",
    "Skip",
    "SweepResult",
    "SweepStaleWorkersOptions",
    "TaskHandler",
    "Worker",
    "WorkerContext",
    "WorkerFenceEvent",
    "WorkerRecoveredEvent",
    "WorkerRecoveryConfig",
    "WorkerSchema",
    "WorkerStartEvent",
    "WorkerStopEvent",
    "WorkerUtils",
    "__version__",
    "load_crontab",
    "migrate",
    "parse_crontab",
    "task",
    "worker_schema",
]
