"""The outcome writer: completions and failures, written in batches, retried, verified.

Each kind has its own connection and batcher: one statement in flight at a time, the
outcomes that finish meanwhile going together in the next. Writes touch only rows still
locked by this worker; a row that was not written is reported as a lost lock, unless an
earlier try of the same write may have been applied before its reply was lost, in which
case the row is read back to tell the two apart.

Until its write has ended, an outcome's job counts as *known* to the worker (see
:meth:`OutcomeWriter.pending_ids`), so the fetcher never reclaims it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._drive import Op
from ..hooks import (
    UNCHANGED,
    Hooks,
    JobCompleteEvent,
    JobFailEvent,
    JobLockLostEvent,
    JobsWrittenEvent,
)
from ..job import Job
from .connection import Database, HeldConnection
from .ops import complete_op, fail_op, written_op

__all__ = ["Completion", "Failure", "OutcomeWriter"]

logger = logging.getLogger("sqla_graphile.worker")
_T = TypeVar("_T", "Completion", "Failure")

# Largest number of outcomes sent in one statement.
_MAX_WRITE_BATCH = 2000


@dataclass(slots=True)
class Completion:
    """A job whose handler succeeded, and how long it ran."""

    job: Job
    duration: float


@dataclass(slots=True)
class Failure:
    """A failed attempt. ``job`` is ``None`` for a row that could not even be decoded."""

    job_id: int
    job: Job | None
    message: str
    exception: BaseException | None
    duration: float
    payload: Any = UNCHANGED


class _Batcher(Generic[_T]):
    """Collects outcomes and writes them in batches, one statement in flight at a time.

    While a statement runs, new outcomes accumulate and go together in the next one; a
    ``delay`` widens that window. :meth:`close` returns once everything is written.
    """

    def __init__(self, delay: float, write: Callable[[list[_T]], Awaitable[None]]) -> None:
        self._delay = delay
        self._write: Callable[[list[_T]], Awaitable[None]] = write
        self.items: list[_T] = []
        self.writing: list[_T] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task = asyncio.create_task(self._loop(), name="sqla_graphile-writer")

    def add(self, item: _T) -> None:
        self.items.append(item)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._delay > 0 and not self._closed:
                await asyncio.sleep(self._delay)
            self._wake.clear()
            while self.items:
                batch = self.writing = self.items[:_MAX_WRITE_BATCH]
                del self.items[:_MAX_WRITE_BATCH]
                try:
                    await self._write(batch)
                except Exception:  # the write logs its own errors; this is a bug
                    logger.exception("writing %d outcome(s) failed", len(batch))
                finally:
                    self.writing = []
            self._idle.set()
            if self._closed:
                return


class OutcomeWriter:
    """Writes the worker's completions and failures; reports what it could not write.

    ``on_released()`` is called after a write that unlocked a named queue (the fetcher
    may find its next job now).
    """

    def __init__(
        self,
        db: Database,
        schema: str,
        worker_id: str,
        hooks: Hooks,
        *,
        complete_delay: float,
        fail_delay: float,
        encode: Callable[[Any], str],
        on_released: Callable[[], None],
    ) -> None:
        self._db = db
        self._schema = schema
        self._worker_id = worker_id
        self._hooks = hooks
        self._encode = encode
        self._on_released = on_released
        self.writes_done = 0
        """Outcome statements finished (or given up): a run-once worker looks again after."""
        self._complete_connection, self._fail_connection = db.held(2)
        self._completions = _Batcher[Completion](complete_delay, self._write_completions)
        self._failures = _Batcher[Failure](fail_delay, self._write_failures)

    # -- the worker's side --------------------------------------------------------------

    def complete(self, job: Job, duration: float) -> None:
        """Queue ``job``'s completion for writing."""
        self._completions.add(Completion(job, duration))

    def fail(self, failure: Failure) -> None:
        """Queue a failure for writing."""
        self._failures.add(failure)

    def pending_ids(self) -> set[int]:
        """Jobs whose outcome is waiting or being written (they are still locked by us)."""
        ids = {c.job.id for c in self._completions.items}
        ids.update(c.job.id for c in self._completions.writing)
        ids.update(f.job_id for f in self._failures.items)
        ids.update(f.job_id for f in self._failures.writing)
        return ids

    async def wait_idle(self) -> None:
        """Return once nothing is waiting to be written."""
        await self._completions.wait_idle()
        await self._failures.wait_idle()

    async def close(self) -> None:
        """Write everything still waiting; then release the connections."""
        await self._completions.close()
        await self._failures.close()
        await self.release()

    async def release(self) -> None:
        """Give the connection back (discarded with ``invalidate``)."""
        await self._complete_connection.release()
        await self._fail_connection.release()

    # -- writing ------------------------------------------------------------------------

    async def _write(
        self,
        op: Op[dict[int, Any]],
        ids: list[int],
        *,
        outcome: str,
        held: HeldConnection,
    ) -> tuple[dict[int, Any], bool] | None:
        """Run an outcome operation: the rows written by id, and whether a try was retried.

        ``None`` when it was given up (logged): those jobs stay locked until recovered.
        """
        retried = False

        def on_retry(_error: BaseException) -> None:
            nonlocal retried
            retried = True

        try:
            written = await self._db.drive(
                op,
                what=f"{'completing' if outcome == 'completion' else 'failing'} {len(ids)} job(s)",
                held=held,
                binary=True,
                on_retry=on_retry,
            )
        except Exception:
            logger.exception(
                "could not record the %s of job(s) %s; they stay locked until recovered",
                outcome,
                ", ".join(map(str, ids)),
            )
            return None
        finally:
            self.writes_done += 1
        return written, retried

    async def _applied_earlier(
        self, missing: list[int], messages: dict[int, str] | None
    ) -> set[int]:
        """Of rows a retried write did not find, those an earlier try had written.

        A completion's row is gone; a failure's carries its message and is no longer
        locked by us. Anything else is a lock really lost.
        """
        try:
            found = await self._db.drive(
                written_op(self._schema, missing), what="checking written outcomes", binary=True
            )
        except Exception:
            logger.warning("could not check the outcomes of job(s) %s", missing, exc_info=True)
            return set()
        if messages is None:
            return {job_id for job_id in missing if job_id not in found}
        return {
            job_id
            for job_id in missing
            if job_id in found
            and found[job_id][1] != self._worker_id
            and found[job_id][2] == messages[job_id]
        }

    async def _write_completions(self, batch: list[Completion]) -> None:
        ids = [c.job.id for c in batch]
        result = await self._write(
            complete_op(self._schema, self._worker_id, ids),
            ids,
            outcome="completion",
            held=self._complete_connection,
        )
        if result is None:
            return
        if self._hooks.has("jobs_written"):  # no coroutine per batch without an observer
            await self._written("complete", len(batch))
        done, retried = result
        missing = [job_id for job_id in ids if job_id not in done]
        if missing and retried:
            done = {**done, **dict.fromkeys(await self._applied_earlier(missing, None))}
        queue_released = False
        log = logger.isEnabledFor(logging.INFO)
        observed = self._hooks.has("job_complete")
        for completion in batch:
            job = completion.job
            if job.id not in done:
                await self.lock_lost(job, "complete")
                continue
            if job.job_queue_id is not None:
                queue_released = True
            if log:
                logger.info(
                    "completed job %d (%s, attempt %d/%d) in %.1f ms",
                    job.id,
                    job.task_identifier,
                    job.attempts,
                    job.max_attempts,
                    completion.duration * 1000,
                )
            if observed:
                await self._hooks.emit(
                    "job_complete", JobCompleteEvent(job, self._worker_id, completion.duration)
                )
        if queue_released:
            self._on_released()

    async def _write_failures(self, batch: list[Failure]) -> None:
        ids = [f.job_id for f in batch]
        op = fail_op(
            self._schema,
            self._worker_id,
            ids,
            [f.message for f in batch],
            [None if f.payload is UNCHANGED else self._encode(f.payload) for f in batch],
        )
        result = await self._write(op, ids, outcome="failure", held=self._fail_connection)
        if result is None:
            return
        if self._hooks.has("jobs_written"):
            await self._written("fail", len(batch))
        written, retried = result
        missing = [job_id for job_id in ids if job_id not in written]
        earlier: set[int] = set()
        if missing and retried:
            messages = {f.job_id: f.message for f in batch}
            earlier = await self._applied_earlier(missing, messages)
        queue_released = False
        for failure in batch:
            job = failure.job
            row = written.get(failure.job_id)
            if row is None:
                if failure.job_id in earlier:
                    continue  # written by an earlier try; its details are not known here
                if job is not None:
                    await self.lock_lost(job, "fail")
                continue
            if job is None:
                logger.error("job %d failed: %s", failure.job_id, failure.message)
                continue
            queue_released = queue_released or job.job_queue_id is not None
            await self._report_failure(failure, job, row)
        if queue_released:
            self._on_released()

    async def _written(self, outcome: str, size: int) -> None:
        await self._hooks.emit("jobs_written", JobsWrittenEvent(self._worker_id, outcome, size))

    async def _report_failure(self, failure: Failure, job: Job, row: Any) -> None:
        _, attempts, max_attempts, run_at = row
        permanent = attempts >= max_attempts
        first_line = failure.message.splitlines()[0] if failure.message else ""
        if permanent:
            logger.error(
                "job %d (%s, attempt %d/%d) failed permanently in %.1f ms: %s",
                job.id,
                job.task_identifier,
                job.attempts,
                job.max_attempts,
                failure.duration * 1000,
                first_line,
            )
        else:
            logger.warning(
                "job %d (%s, attempt %d/%d) failed in %.1f ms, retry at %s: %s",
                job.id,
                job.task_identifier,
                job.attempts,
                job.max_attempts,
                failure.duration * 1000,
                run_at.isoformat(),
                first_line,
            )
        event = "job_permanently_fail" if permanent else "job_fail"
        if self._hooks.has(event):
            await self._hooks.emit(
                event,
                JobFailEvent(
                    job,
                    self._worker_id,
                    failure.message,
                    failure.exception,
                    not permanent,
                    run_at,
                    failure.duration,
                ),
            )

    async def lock_lost(self, job: Job, outcome: str) -> None:
        """Say (log and ``job_lock_lost``) that ``job``'s row was no longer ours."""
        logger.warning(
            "job %d (%s, attempt %d): its lock is no longer held by %s; the %s was not "
            "written (the job was unlocked or taken over meanwhile)",
            job.id,
            job.task_identifier,
            job.attempts,
            self._worker_id,
            {"complete": "completion", "fail": "failure", "return": "return"}[outcome],
        )
        if self._hooks.has("job_lock_lost"):
            await self._hooks.emit("job_lock_lost", JobLockLostEvent(job, self._worker_id, outcome))
