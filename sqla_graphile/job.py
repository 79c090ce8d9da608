"""``Job``: a job row as the application sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["Job"]


# Not frozen: a frozen dataclass pays one object.__setattr__ per field on construction,
# and jobs are built by the thousand when adding in batches.
@dataclass(slots=True)
class Job:
    """A job: every column of the ``jobs`` view, plus its payload and internal ids.

    Timestamps are timezone-aware. ``flags`` is the set of the job's flags (the database
    stores them as a JSON object whose keys are the flags). A ``Job`` is a snapshot of
    the row when it was read; changing its fields changes nothing in the database.
    """

    id: int
    queue_name: str | None
    task_identifier: str
    payload: Any
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    key: str | None
    locked_at: datetime | None
    locked_by: str | None
    revision: int
    flags: frozenset[str] | None
    task_id: int
    job_queue_id: int | None

    @property
    def is_permanently_failed(self) -> bool:
        """Whether the job has used all its attempts (and will not run again)."""
        return self.attempts >= self.max_attempts

    @property
    def is_locked(self) -> bool:
        """Whether a worker holds the job (it is running, or its worker died)."""
        return self.locked_at is not None

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any], *, task_identifier: str, queue_name: str | None
    ) -> Job:
        """Build a ``Job`` from a ``_private_jobs`` row and its resolved names."""
        flags = row["flags"]
        return cls(
            id=row["id"],
            queue_name=queue_name,
            task_identifier=task_identifier,
            payload=row["payload"],
            priority=row["priority"],
            run_at=row["run_at"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            last_error=row["last_error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            key=row["key"],
            locked_at=row["locked_at"],
            locked_by=row["locked_by"],
            revision=row["revision"],
            flags=frozenset(flags) if flags is not None else None,
            task_id=row["task_id"],
            job_queue_id=row["job_queue_id"],
        )
