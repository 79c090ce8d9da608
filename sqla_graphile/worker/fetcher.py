"""The fetcher: locks jobs, keeps the local queue, and hands jobs to the executor.

It owns everything between the database's runnable jobs and a started handler: the fetch
connection, the cached task ids, the local queue and its bounds, the idle worker's quick
fetch, and the rows locked under our id that we must give back.

Bounds of the local queue (jobs locked ahead of free slots):

* at most ``local_queue_size`` jobs; with the default size, also at most about
  :data:`LOCAL_QUEUE_HORIZON` seconds of this worker's recent throughput, so slow jobs
  are not hoarded from sibling workers and an urgent job waits behind little work;
  newly fetched jobs of a higher priority go ahead of those queued;
* unstarted jobs go back after ``local_queue_ttl`` seconds and at shutdown;
* a keyed job that waited in the queue is checked before it starts: replaced or removed
  meanwhile (Node's ``add_job``/``remove_job`` detach it), it is deleted, never run.

Whenever a fetch may have locked rows whose answer never arrived (an error, a timeout, a
lost connection), the fetcher *reclaims*: every row locked under our worker id that we do
not know of is given back before the next fetch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import InvalidArgumentType, SchemaNotMigrated, is_transient
from ..hooks import Hooks, JobEvent, JobsFetchedEvent
from ..job import Job
from ..sql import WorkerStatements, statements
from ._aio import Flag, bounded, wait_event
from .connection import Database, first_line
from .decode import decode_jobs
from .executor import Executor
from .ops import claim_keyed_op, reclaim_op, register_tasks_op, return_jobs_op, task_ids_op
from .quick import QuickFetch
from .writer import Failure, OutcomeWriter

__all__ = ["LOCAL_QUEUE_HORIZON", "Fetcher"]

logger = logging.getLogger("sqla_graphile.worker")

#: Seconds of this worker's recent throughput the local queue holds at most.
LOCAL_QUEUE_HORIZON = 0.1
# Shortest span over which throughput is measured.
_RATE_SPAN = 0.05

ForbiddenFlags = (
    Sequence[str] | Callable[[], "Sequence[str] | Awaitable[Sequence[str] | None] | None"]
)


class Fetcher:
    """Fetches jobs for one worker run and feeds the executor."""

    def __init__(
        self,
        *,
        db: Database,
        schema: str,
        worker_id: str,
        identifiers: list[str],
        executor: Executor,
        writer: OutcomeWriter,
        hooks: Hooks,
        concurrency: int,
        poll_interval: float,
        local_queue_size: int,
        local_queue_ttl: float,
        horizon: float | None,
        forbidden_flags: ForbiddenFlags | None,
        loads: Callable[[str], Any],
        stop: asyncio.Event,
        once: bool,
        quick: bool,
        reclaim: bool = False,
    ) -> None:
        self.db = db
        self.schema = schema
        self.sql: WorkerStatements = statements(schema).worker
        self.worker_id = worker_id
        self.identifiers = identifiers
        self.executor = executor
        self.writer = writer
        self.hooks = hooks
        self.concurrency = concurrency
        self.poll = poll_interval
        self.local_queue_size = local_queue_size
        self.ttl = local_queue_ttl
        self.horizon = horizon
        self.forbidden_flags = forbidden_flags
        self.loads = loads
        self.stop = stop
        self.once = once
        (self.connection,) = db.held(1)
        self.prefetch = local_queue_size > 0 and not callable(forbidden_flags)
        self.task_names: dict[int, str] = {}
        """Our tasks' ids (as last looked up) and their identifiers."""
        self.task_ids: list[int] = []
        self.tasks_checked = 0.0
        self.local: deque[tuple[Job, float]] = deque()
        self.checking: list[tuple[Job, float]] = []
        """Keyed jobs that waited, being checked before they start (their slots held)."""
        self._check_task: asyncio.Task[None] | None = None
        self.notified = 0
        """Jobs announced by ``jobs:insert`` since the last fetch began."""
        self.fetch_when_one_ends = False
        self.fetch_waiting = False
        """Whether the fetch loop is parked, idle, leaving its connection to a quick fetch."""
        self.tasks_suspect = False
        """A quick fetch came back empty: look up the task ids before fetching again."""
        self.suspect = reclaim
        """A fetch may have locked rows we never saw: reclaim before the next fetch."""
        self.ttl_expired = False
        self.paused = False
        """Fenced: no fetch, and nothing started, until resumed."""
        self.nudge = Flag()
        self.refill = Flag()
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_ended = 0
        self.quick: QuickFetch | None = (
            QuickFetch(
                self.sql.fetch_one, on_rows=self._quick_rows, on_fallback=self._quick_fallback
            )
            if quick and forbidden_flags is None
            else None
        )

    # -- signals from elsewhere ---------------------------------------------------------

    def on_insert(self, count: int) -> None:
        """``jobs:insert`` announced ``count`` jobs."""
        self.notified += count
        quick = self.quick
        if (
            quick is not None
            and self.fetch_waiting
            and not (self.executor.running or self.local or self.stop.is_set() or self.paused)
            and not self.hooks.has("job_fetch")  # an async observer needs the fetch loop
            and quick.start({"worker_id": self.worker_id, "task_ids": self.task_ids})
        ):
            self.notified = 0
            return
        self.nudge.set()

    def idle(self) -> bool:
        """Waiting for work: asleep with no wake-up pending, nothing running or queued."""
        return (
            self.fetch_waiting
            and not self.nudge.is_set()
            and not self.executor.running
            and not self.local
            and not self.checking
        )

    def on_slot_free(self) -> None:
        """A job ended: start queued jobs, and fetch if the queue runs low."""
        if self.fetch_when_one_ends:
            self.fetch_when_one_ends = False
            self.nudge.set()
        self.dispatch()
        if not self.refill.is_set() and self.fetch_size() > 0:
            self.refill.set()

    def wake(self) -> None:
        """Wake the fetch loop (a stop, a fence lifted)."""
        self.nudge.set()
        self.refill.set()

    def pause(self) -> None:
        """Stop fetching and starting (a fence); the jobs queued locally are given up.

        They stay locked under our id, unknown: :meth:`resume` reclaims them (a peer may
        have recovered them meanwhile: they must not start here unchecked). So are the
        jobs of a fetch, or a keyed check, that ends while paused.
        """
        self.paused = True
        self.local.clear()
        self.executor.take_back()

    def resume(self) -> None:
        """Fetch and start again after a fence; reclaim what it left locked."""
        self.paused = False
        self.suspect = True  # whatever a fetch cut off by the fence locked
        self.wake()

    # -- the local queue ----------------------------------------------------------------

    def fetch_size(self) -> int:
        """Fetch size."""
        running = len(self.executor.running) + len(self.checking)
        queued = len(self.local)
        needed = max(0, self.concurrency - running - queued)
        if not self.prefetch or self.ttl_expired:
            return needed
        size = self.local_target()
        if needed > 0 or queued <= size // 2:
            return max(needed, size - queued)
        return 0

    def local_target(self) -> int:
        """How many jobs to keep queued: recent throughput over the horizon, capped."""
        if self.horizon is None:
            return self.local_queue_size
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= _RATE_SPAN:
            ended = self.executor.ended
            rate = (ended - self._rate_ended) / elapsed
            self._rate = rate if elapsed > 1.0 else (self._rate + rate) / 2
            self._rate_at, self._rate_ended = now, ended
        return min(self.local_queue_size, int(self._rate * self.horizon))

    def take(self, jobs: list[Job], *, idle: bool) -> None:
        """Start (or queue locally) jobs just fetched."""
        if self.paused:  # fenced while the fetch was out: given up as by pause()
            return
        self.ttl_expired = False
        now = time.monotonic()
        local = self.local
        if local and jobs and jobs[0].priority < local[-1][0].priority:
            # More urgent than jobs queued: they go ahead (in fetch order).
            merged = sorted(
                [*local, *((job, now) for job in jobs)],
                key=lambda entry: (entry[0].priority, entry[0].run_at),
            )
            local.clear()
            local.extend(merged)
        else:
            local.extend((job, now) for job in jobs)
        self.dispatch(fresh=now)
        if idle and jobs and self.executor.any_sync:
            # Let a handler thread just handed a job take the GIL now, rather than
            # when the loop next blocks: it starts its handler that much sooner.
            time.sleep(0)

    def dispatch(self, fresh: float | None = None) -> None:
        """Hand queued jobs to the executor while it has room.

        ``fresh``: the stamp of the jobs just fetched, which start without a check.
        """
        if self.paused or self.stop.is_set():
            return
        executor = self.executor
        local = self.local
        while local:
            job, fetched = local[0]
            if job.key is not None:
                # A keyed job starts only where it starts at once, as with Node's
                # defaults; one that waited is checked first (replaced? removed?).
                if executor.idle_slots() - len(self.checking) <= 0:
                    return
                local.popleft()
                if fetched != fresh:
                    self.checking.append((job, fetched))
                    if self._check_task is None:
                        self._check_task = asyncio.create_task(self._check_keyed())
                    continue
            elif self.checking or executor.capacity() <= 0:
                # Jobs behind a keyed job being checked wait for it: priority order holds.
                return
            else:
                local.popleft()
            executor.start(job, fetched)

    async def _check_keyed(self) -> None:
        try:
            while self.checking:
                batch = list(self.checking)
                ids = [job.id for job, _ in batch]
                try:
                    kept = await self.db.drive(
                        claim_keyed_op(self.schema, self.worker_id, ids),
                        what="checking queued keyed jobs",
                    )
                except Exception as exc:
                    logger.warning("checking queued keyed jobs failed: %s", first_line(exc))
                    await asyncio.sleep(min(self.poll, 1.0))
                    continue
                del self.checking[: len(batch)]
                for job, fetched in batch:
                    if job.id not in kept:
                        logger.info(
                            "job %d (%s, key %r) was replaced or removed while queued; not run",
                            job.id,
                            job.task_identifier,
                            job.key,
                        )
                    elif self.stop.is_set() and not self.paused:
                        self.local.appendleft((job, fetched))  # returned with the others
                    elif not self.paused:  # fenced meanwhile: given up as by pause()
                        self.executor.start(job, fetched)
                self.on_slot_free()
        finally:
            self._check_task = None

    async def expire_local(self) -> None:
        """Give back jobs queued longer than the TTL."""
        if self.ttl <= 0:
            return
        limit = time.monotonic() - self.ttl
        oldest = self.executor.oldest_fetch()
        waited = oldest is not None and oldest < limit
        if not ((self.local and self.local[0][1] < limit) or waited):
            return
        expired = []
        while self.local and self.local[0][1] < limit:
            expired.append(self.local.popleft()[0])
        if waited:
            expired += self.executor.take_back(older_than=limit)
        if expired:
            self.ttl_expired = True
            logger.info("returning %d job(s) unstarted for %g s", len(expired), self.ttl)
            await self.give_back(expired)

    async def give_back(self, jobs: list[Job]) -> None:
        """Return unstarted jobs (attempt refunded); detached ones are deleted."""
        if not jobs:
            return
        try:
            released = await self.db.drive(
                return_jobs_op(self.schema, self.worker_id, [job.id for job in jobs]),
                what="returning unstarted jobs",
                retries=20,
                retry_any=True,
            )
        except Exception:
            logger.exception(
                "could not return %d unstarted job(s); they stay locked until recovered",
                len(jobs),
            )
            return
        for job in jobs:
            if job.id not in released:
                await self.writer.lock_lost(job, "return")
            elif released[job.id]:
                logger.info("job %d was replaced or removed while queued; deleted", job.id)
        if any(job.job_queue_id is not None for job in jobs):
            self.nudge.set()

    async def return_all(self) -> None:
        """At shutdown: every job queued locally (or waiting for a thread) goes back."""
        jobs = [job for job, _ in self.local]
        self.local.clear()
        await self.give_back(jobs + self.executor.take_back())

    async def reclaim(self, known: set[int]) -> bool:
        """Give back every row locked under our id but not in ``known``; whether it ran."""
        try:
            given_back = await self.db.drive(
                reclaim_op(self.schema, self.worker_id, sorted(known)),
                what="reclaiming jobs locked by a lost fetch",
                retries=3,
            )
        except Exception as exc:
            logger.warning("reclaiming jobs locked by a lost fetch failed: %s", first_line(exc))
            return False
        self.suspect = False
        if given_back:
            logger.warning(
                "gave back %d job(s) locked under this worker's id by a fetch whose answer "
                "was lost: %s",
                len(given_back),
                ", ".join(map(str, given_back)),
            )
            self.nudge.set()
        return True

    def known_ids(self) -> set[int]:
        """Every job this worker holds and knows of."""
        known = self.executor.job_ids() | self.writer.pending_ids()
        known.update(job.id for job, _ in self.local)
        known.update(job.id for job, _ in self.checking)
        return known

    # -- task ids -----------------------------------------------------------------------

    async def register_tasks(self) -> None:
        """Make sure our tasks have rows, then read their ids."""
        await self.db.drive(
            register_tasks_op(self.schema, self.identifiers), what="registering tasks"
        )
        await self.look_up_tasks()

    async def look_up_tasks(self) -> bool:
        """Read our tasks' ids afresh; whether they changed since the last look."""
        names = await self.db.drive(
            task_ids_op(self.schema, self.identifiers),
            what="looking up task ids",
            held=self.connection,
        )
        self.tasks_checked = time.monotonic()
        if names == self.task_names:
            return False
        if self.task_names:
            logger.info("task ids changed (task rows were garbage-collected); fetching anew")
        self.task_names = names
        self.task_ids = list(names)
        return True

    async def tasks_changed(self) -> bool:
        """:meth:`look_up_tasks`, its failure logged and taken for "no change"."""
        try:
            return await self.look_up_tasks()
        except Exception as exc:
            if not is_transient(exc):
                logger.exception("looking up task ids failed")
            return False

    # -- fetching -----------------------------------------------------------------------

    async def forbidden(self) -> list[str] | None:
        """The forbidden flags for the next fetch (``None``: none)."""
        flags = self.forbidden_flags
        if flags is None:
            return None
        if callable(flags):
            value = flags()
            if inspect.isawaitable(value):
                value = await value
            flags = value
        if flags is None:
            return None
        if isinstance(flags, str):
            raise InvalidArgumentType("forbidden_flags must be a list of flags, not a string")
        listed = [str(flag) for flag in flags]
        return listed or None

    async def fetch(self, limit: int) -> list[Job]:
        """Lock up to ``limit`` runnable jobs; the decodable ones, in start order."""
        flags = await self.forbidden()
        params: dict[str, Any] = {"worker_id": self.worker_id, "task_ids": self.task_ids}
        if limit == 1:
            statement = self.sql.fetch_one if flags is None else self.sql.fetch_one_with_flags
        else:
            statement = self.sql.fetch if flags is None else self.sql.fetch_with_flags
            params["limit"] = limit
        if flags is not None:
            params["forbidden"] = flags
        try:
            rows = await self.db.execute(
                statement,
                params,
                what="fetching jobs",
                held=self.connection,
                binary=True,
                on_retry=self._fetch_failed,
            )
        except BaseException:
            self._fetch_failed(None)
            raise
        jobs = self.decode(rows)
        if jobs and self.hooks.has("jobs_fetched"):
            await self.hooks.emit("jobs_fetched", JobsFetchedEvent(self.worker_id, tuple(jobs)))
        if jobs and self.hooks.has("job_fetch"):
            for job in jobs:
                await self.hooks.emit("job_fetch", JobEvent(job, self.worker_id))
        return jobs

    def _fetch_failed(self, _error: BaseException | None) -> None:
        # A failed try may have committed, its answer lost: reclaim before fetching on.
        self.suspect = True

    def decode(self, rows: Sequence[Any]) -> list[Job]:
        """The jobs of fetched rows; a row that cannot be decoded fails its job alone."""
        jobs, poison = decode_jobs(rows, self.task_names, self.loads)
        for job_id, message in poison:
            logger.error("job %d could not be decoded; failing it: %s", job_id, message)
            self.writer.fail(Failure(job_id, None, message, None, 0.0))
        return jobs

    def _quick_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """The answer of a quick fetch (:mod:`.quick`)."""
        jobs = self.decode(rows)
        if not jobs:
            self.tasks_suspect = True
            self.nudge.set()
            return
        if self.hooks.has("jobs_fetched"):
            self.hooks.emit_soon("jobs_fetched", JobsFetchedEvent(self.worker_id, tuple(jobs)))
        self.take(jobs, idle=True)
        # As after any fetch of what was announced: the next waits until a job ends.
        self.fetch_when_one_ends = True

    def _quick_fallback(self) -> None:
        """A quick fetch failed (it may have locked a job): the fetch loop takes over."""
        self.suspect = True
        self.notified = max(self.notified, 1)
        self.nudge.set()

    async def run(self) -> None:
        """The fetch loop, until the stop event is set."""
        while not self.stop.is_set():
            if self.paused:
                await self.nudge.wait(self.poll)
                self.nudge.clear()
                continue
            if self.suspect and not await self.reclaim(self.known_ids()):
                await wait_event(self.stop, self.poll)
                continue
            if self.tasks_suspect:
                # A quick fetch found none of the jobs announced: they may be another
                # worker's, or of tasks not ours, or ours under task ids we do not know
                # yet. Only the last needs a fetch, so look up the ids first.
                self.tasks_suspect = False
                self.nudge.clear()
                if not await self.tasks_changed() and not self.nudge.is_set():
                    await self.wait_idle()
                continue
            await self.expire_local()
            want = self.fetch_size()
            if want == 0:
                # Busy: wait until the local queue runs low (or a TTL check).
                self.refill.clear()
                await self.refill.wait(self.poll)
                continue
            announced = want
            notified = self.notified
            idle = not self.executor.running and not self.local
            if notified and idle:
                # Woken from idle by notifications: fetch what they announced (often one
                # job, with the cheaper single-job statement). If that many come, the
                # next fetch, for anything else runnable, waits until one of them ends
                # (or the poll interval), so that nothing delays their start.
                announced = min(want, notified)
            self.notified = 0
            self.fetch_when_one_ends = False
            self.nudge.clear()
            writes_before = self.writer.writes_done
            try:
                jobs = await self.fetch(announced)
            except Exception as exc:
                if isinstance(exc, SchemaNotMigrated) or not is_transient(exc):
                    logger.exception("fetching jobs failed")
                await wait_event(self.stop, self.poll)
                continue
            self.take(jobs, idle=idle)
            if self.suspect:
                continue  # reclaim what a lost answer locked, then fetch again
            now = time.monotonic()
            # Task ids are cached; a garbage collection of task rows by any process gives
            # new jobs of our tasks new ids. Look again (with the jobs already started)
            # when announced jobs were not found and at least every poll interval.
            if (
                (notified and not jobs) or now - self.tasks_checked >= self.poll
            ) and await self.tasks_changed():
                continue
            if len(jobs) >= want:
                continue
            self.fetch_when_one_ends = len(jobs) >= announced
            # The database had fewer runnable jobs than we asked for.
            if self.once:
                if await self.once_finished(jobs, writes_before):
                    return
                continue
            if not self.nudge.is_set():
                await self.wait_idle()

    async def wait_idle(self) -> None:
        """Wait for a nudge (or the poll interval); a quick fetch may run meanwhile."""
        quick = self.quick
        if quick is None or not await quick.prepare(self.connection.raw):
            await self.nudge.wait(self.poll)
            return
        self.fetch_waiting = True
        try:
            await self.nudge.wait(self.poll)
        finally:
            self.fetch_waiting = False
        # The connection is the fetch loop's again only once the answer is in; on a
        # silent link, cutting it ends the quick fetch (as a fallback).
        try:
            await bounded(quick.settled(), self.db.statement_timeout)
        except asyncio.TimeoutError:
            self.connection.sever()
            await quick.settled()

    async def once_finished(self, jobs: list[Job], writes_before: int) -> bool:
        """In run-once mode: whether nothing is left to do, after a short fetch."""
        if jobs or self.executor.running or self.local or self.checking:
            # Wait for a running job to end (its outcome may unlock a queue).
            if self.executor.running or self.local or self.checking:
                await self.executor.wait(self.poll, one=True)
            return False
        await self.writer.wait_idle()
        # Writes since that fetch may have released queues: then look again.
        return self.writer.writes_done == writes_before

    async def close(self) -> None:
        """Release what the component holds."""
        if self._check_task is not None:
            await asyncio.gather(self._check_task, return_exceptions=True)
        await self.connection.release()
