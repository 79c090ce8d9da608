"""sqla-graphile: Graphile Worker's PostgreSQL job queue for SQLAlchemy applications."""

from __future__ import annotations

from ._version import __version__
from .context import CancellationSignal, WorkerContext
from .errors import (
    DatabaseNewerThanLibrary,
    GraphileWorkerError,
    InvalidJobKeyMode,
    InvalidSchemaName,
    JobScheduleFailed,
    JobScheduleSkipped,
    MigrationError,
    NotSchemaOwner,
    PayloadNotSerializable,
    SchemaNotMigrated,
)
from .hooks import BeforeJobScheduleContext, Continue, Fail, Hooks, Skip
from .job import Job
from .migrations import migrate
from .recovery import ActiveWorker, SweepResult, SweepStaleWorkersOptions, WorkerRecoveryConfig
from .schema import DEFAULT_SCHEMA, WorkerSchema, worker_schema
from .specs import CleanupTask, JobKeyMode, JobSpec, RawJobSpec, RescheduleJobOptions
from .tasks import BatchTaskHandler, FunctionTask, TaskHandler, task
from .utils import AsyncWorkerUtils, WorkerUtils

__all__ = [
    "DEFAULT_SCHEMA",
    "ActiveWorker",
    "AsyncWorkerUtils",
    "BatchTaskHandler",
    "BeforeJobScheduleContext",
    "CancellationSignal",
    "CleanupTask",
    "Continue",
    "DatabaseNewerThanLibrary",
    "Fail",
    "FunctionTask",
    "GraphileWorkerError",
    "Hooks",
    "InvalidJobKeyMode",
    "InvalidSchemaName",
    "Job",
    "JobKeyMode",
    "JobScheduleFailed",
    "JobScheduleSkipped",
    "JobSpec",
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
    "WorkerContext",
    "WorkerRecoveryConfig",
    "WorkerSchema",
    "WorkerUtils",
    "__version__",
    "migrate",
    "task",
    "worker_schema",
]
