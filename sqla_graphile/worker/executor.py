"""The executor: runs handlers (``def`` in threads, ``async def`` on the loop) and ends jobs.

Every job takes one way: :meth:`Executor.start` launches its handler (behind the
interceptors when there are any), and :meth:`Executor._end` frees its slot and hands the
outcome to the writer. Nothing a handler raises, ``KeyboardInterrupt`` and ``SystemExit``
included, escapes into the worker: it fails that job and no other.

A job with a time limit (its task's ``timeout`` or the worker's ``job_timeout``) that
reaches it ends there, failed with :class:`~sqla_graphile.errors.JobTimedOut`: its
``async def`` handler is cancelled, its ``def`` handler signalled through
``ctx.cancellation``. Until the handler really returns it keeps its slot (and thread),
so the worker never runs more than ``concurrency`` handlers; what it returns is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import CancellationSignal, WorkerContext
from ..errors import JobTimedOut
from ..hooks import (
    UNCHANGED,
    AfterJobRunContext,
    BeforeJobRunContext,
    Continue,
    Fail,
    Hooks,
    JobEvent,
    Skip,
)
from ..job import Job
from ..utils import AsyncWorkerUtils, WorkerUtils
from ._threads import HandlerThreads
from .failures import (
    BatchItemsFailed,
    HandlerExit,
    HookFailure,
    ShutdownFailure,
    describe,
    message_of,
)
from .tasks import TaskRegistry, WorkerTask, batch_outcome
from .writer import Failure, OutcomeWriter

__all__ = ["Executor", "Running"]

logger = logging.getLogger("sqla_graphile.worker")

# With only ``def`` handlers, jobs handed to the threads at once, per unit of concurrency.
_AHEAD = 4
# How often a thread waiting on an awaitable its handler returned checks the worker.
_THREAD_WAIT_CHECK = 1.0


@dataclass(slots=True)
class Running:
    """A job handed to the executor, from its start to its end."""

    job: Job
    started: float
    fetched: float
    handler: asyncio.Future[Any] | None = None
    """The ``async def`` handler's task (or an awaitable a ``def`` handler returned)."""
    ends_itself: bool = False
    """``handler`` is a task that ends the job itself (:meth:`Executor._run_handler`)."""
    task: asyncio.Task[None] | None = None
    """The task running the interceptors around the handler, when there are any."""
    cancelled: bool = False
    """The worker cancelled the handler (shutdown or fence)."""
    abandoned: bool = False
    """No longer ours to end: failed by the shutdown, or dropped by a fence."""
    done: Done | None = None
    """Where the handler's end goes (``done(record, result, error)``), once."""
    in_handler: bool = False
    """The handler was launched and has not returned yet."""
    timeout: float | None = None
    """The job's time limit in seconds, if it has one."""
    signal: CancellationSignal | None = None
    """The job's own ``ctx.cancellation`` (jobs with a time limit), else the shared one."""
    timer: asyncio.TimerHandle | None = None
    """Fires at the time limit."""
    timed_out: bool = False
    """The job reached its time limit and was failed there."""
    overtime_key: int | None = None
    """While a timed-out job's handler still runs: its key in ``Executor.running``."""


Done = Callable[["Running", Any, "BaseException | None"], None]


class Executor:
    """Runs jobs' handlers within ``concurrency``; ends each job exactly once.

    ``on_slot_free()`` is called whenever a job ends (the fetcher refills).
    """

    def __init__(
        self,
        *,
        tasks: TaskRegistry,
        concurrency: int,
        grace: float,
        job_timeout: float | None = None,
        hooks: Hooks,
        worker_id: str,
        writer: OutcomeWriter,
        utils: WorkerUtils,
        async_utils: AsyncWorkerUtils,
        on_slot_free: Callable[[], None],
    ) -> None:
        self.tasks = tasks
        self.concurrency = concurrency
        self.grace = grace
        self.job_timeout = job_timeout
        self.hooks = hooks
        self.worker_id = worker_id
        self.writer = writer
        self.utils = utils
        self.async_utils = async_utils
        self.on_slot_free = on_slot_free
        self.loop = asyncio.get_running_loop()
        self.running: dict[int, Running] = {}
        """Every job holding a slot, by id; a timed-out job whose handler still runs is
        kept under a negative key of its own (its id may be fetched again meanwhile)."""
        self._overtime_keys = itertools.count(-1, -1)
        self.cancellation = CancellationSignal()
        self.threads = HandlerThreads(concurrency, "sqla_graphile-handler")
        self.all_sync = not any(entry.is_async for entry in tasks.values())
        self.any_sync = not all(entry.is_async for entry in tasks.values())
        self.ended = 0
        """Jobs ended so far (the fetcher measures throughput by it)."""
        self.on_overtime: Callable[[Running], None] | None = None
        """Called with a job failed at its time limit whose handler runs on (the watchdog)."""
        self._ended_event = asyncio.Event()
        # Each job's first task starts from a copy of this, not of the context of
        # whatever started it (often the task of the job that just ended).
        self._context_base = contextvars.copy_context()
        self._starting = False

    # -- capacity -----------------------------------------------------------------------

    @property
    def intercepted(self) -> bool:
        """Whether interceptors or ``job_start`` observers wrap each job."""
        hooks = self.hooks
        return bool(
            hooks.before_job_run_hooks or hooks.after_job_run_hooks or hooks.has("job_start")
        )

    def capacity(self) -> int:
        """Jobs that may be started now: free threads, plus a few ahead for ``def``-only."""
        limit = self.concurrency
        if self.all_sync and not self.intercepted:
            # Hand the threads jobs ahead of time, so a thread that ends a job starts the
            # next without waiting for the loop; the threads still bound what runs.
            limit *= _AHEAD
        return limit - len(self.running)

    def idle_slots(self) -> int:
        """Slots where a job would start at once (not wait for a thread)."""
        return self.concurrency - len(self.running)

    def job_ids(self) -> set[int]:
        """The ids of the jobs running (or waiting for a thread)."""
        return {key for key in self.running if key > 0}

    # -- starting -----------------------------------------------------------------------

    def start(self, job: Job, fetched: float) -> None:
        """Start ``job`` (fetched at ``fetched``): its handler, behind any interceptors."""
        record = Running(job, time.monotonic(), fetched)
        self.running[job.id] = record
        context = self._context_base.copy()
        self._starting = True  # an eager task factory may end the job within this call
        try:
            if self.intercepted:
                record.task = context.run(asyncio.create_task, self._run_intercepted(record))
            else:
                self._launch(record, job.payload, self._handler_returned, context)
        finally:
            self._starting = False

    def _context(self, record: Running, limit: float | None) -> WorkerContext:
        cancellation = self.cancellation
        if limit is not None:
            # A job that can time out gets a signal of its own: its limit asks it alone.
            record.timeout = limit
            signal = record.signal = CancellationSignal()
            if cancellation.is_set:
                signal.set()
            cancellation = signal
        return WorkerContext(
            record.job, self.worker_id, None, self.utils, cancellation, self.async_utils
        )

    def _launch(
        self, record: Running, payload: Any, done: Done, context: contextvars.Context | None
    ) -> None:
        """Start the handler; ``done(record, result, error)`` is called once it ends.

        ``context``: where an ``async def`` handler's task starts; ``None`` behind
        interceptors, whose task's context it inherits. Only with a ``context`` may a
        ``def`` handler's call, not started yet, be taken back.
        """
        record.done = done
        record.in_handler = True
        entry = self.tasks.get(record.job.task_identifier)
        if entry is None:  # a task row renamed under us; never expected
            error = LookupError(f"no handler for task {record.job.task_identifier!r}")
            self.loop.call_soon(self._handler_ended, record, None, error)
            return
        limit = entry.timeout if entry.timeout is not None else self.job_timeout
        ctx = self._context(record, limit)
        if not entry.is_async:
            # The limit counts from the moment a thread starts the handler (see there).
            self.threads.call(
                self._run_in_thread,
                (record, entry, payload, ctx),
                functools.partial(self._handler_ended, record),
                takeable=context is not None,
            )
            return
        if self.hooks.job_run_context_hooks:
            # The context managers are entered in the handler's own task, around it.
            coroutine = _scoped(self.hooks, record.job, entry.invoke, payload, ctx)
        else:
            try:
                coroutine = entry.invoke(payload, ctx)
            except Exception as exc:
                # Not now: the caller may be filling slots, which the outcome would re-enter.
                self.loop.call_soon(self._handler_ended, record, None, exc)
                return
        record.ends_itself = True
        handler = self._run_handler(record, coroutine)
        if context is None:
            record.handler = self.loop.create_task(handler)
        else:
            record.handler = context.run(self.loop.create_task, handler)
        if limit is not None:
            record.timer = self.loop.call_later(limit, self._time_out, record)

    def _run_in_thread(
        self, record: Running, entry: WorkerTask, payload: Any, ctx: WorkerContext
    ) -> Any:
        """Run a ``def`` handler (in a handler thread).

        An awaitable it returns is awaited on the loop while this thread waits for it:
        the job keeps its thread, so the threads keep bounding the jobs running at once.
        The wait ends when the awaitable does, or when the worker has gone.
        """
        record.started = time.monotonic()  # it may have waited for a thread
        if record.timeout is not None:
            try:
                self.loop.call_soon_threadsafe(self._arm, record)
            except RuntimeError:  # the loop is closed: the worker is gone
                raise ShutdownFailure("the worker stopped before the job started") from None
        if self.hooks.job_run_context_hooks:
            with self.hooks.run_scope(record.job):
                result = entry.invoke(payload, ctx)
        else:
            result = entry.invoke(payload, ctx)
        if result is None or not inspect.isawaitable(result):
            return result
        future = asyncio.run_coroutine_threadsafe(self._await_in_loop(record, result), self.loop)
        while True:
            try:
                return future.result(_THREAD_WAIT_CHECK)
            except concurrent.futures.TimeoutError:
                if self.loop.is_closed() or record.abandoned:
                    future.cancel()
                    raise ShutdownFailure("the worker stopped while the job ran") from None

    async def _await_in_loop(self, record: Running, awaitable: Any) -> Any:
        record.handler = asyncio.ensure_future(_guarded(awaitable))
        return await record.handler

    async def _run_handler(self, record: Running, coroutine: Any) -> None:
        """An ``async def`` handler's task: await it, then end the job from the task.

        Ending it here, not from a done callback, saves a turn of the loop per job. Its
        cancellation is the handler's (a time limit, a shutdown, a fence): an outcome.
        """
        try:
            result = await coroutine
        except (KeyboardInterrupt, SystemExit) as exc:
            self._handler_ended(record, None, HandlerExit.of(exc))
        except BaseException as exc:  # CancelledError included, as above
            self._handler_ended(record, None, exc)
        else:
            self._handler_ended(record, result, None)

    def _cancel_handler(self, record: Running) -> bool:
        """Cancel the job's handler (if it runs on the loop); whether it was running."""
        handler = record.handler
        if handler is None or handler.done():
            return False
        handler.cancel()
        if record.ends_itself:
            handler.add_done_callback(functools.partial(self._cancelled_unstarted, record))
        return True

    def _cancelled_unstarted(self, record: Running, handler: asyncio.Future[Any]) -> None:
        # Cancelled before its first step, the task never ran _run_handler: end it here.
        if handler.cancelled() and record.in_handler:
            self._handler_ended(record, None, asyncio.CancelledError())

    def _handler_ended(self, record: Running, result: Any, error: BaseException | None) -> None:
        """The handler returned (or raised): its end goes on, unless its limit came first."""
        record.in_handler = False
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        if not record.timed_out:
            assert record.done is not None
            record.done(record, result, error)
            return
        # The job was failed at its time limit; its handler has ended at last, and what it
        # returned is dropped. Its slot, held meanwhile, is free now.
        logger.info(
            "job %d (%s) ended %.1f s after its time limit; it had been failed then",
            record.job.id,
            record.job.task_identifier,
            max(0.0, time.monotonic() - record.started - (record.timeout or 0.0)),
        )
        key = record.overtime_key
        if key is not None:
            record.overtime_key = None
            if self.running.pop(key, None) is record:
                self._ended_event.set()
                self.on_slot_free()

    def _arm(self, record: Running) -> None:
        """Start the time limit of a ``def`` handler a thread has just started."""
        if record.in_handler and record.timer is None and not record.abandoned:
            assert record.timeout is not None
            record.timer = self.loop.call_later(record.timeout, self._time_out, record)

    def _time_out(self, record: Running) -> None:
        """The job's time limit: ask its handler to stop, and end the job as failed now."""
        record.timer = None
        if not record.in_handler or record.abandoned or record.timed_out:
            return
        assert record.timeout is not None and record.done is not None
        record.timed_out = True
        if record.signal is not None:
            record.signal.set()
        self._cancel_handler(record)
        identifier = record.job.task_identifier
        entry = self.tasks.get(identifier)
        if entry is not None and entry.timeout is not None:
            source = f"timeout of task {identifier!r}"
        else:
            source = "the worker's job_timeout"
        message = f"Job timed out after {record.timeout:g} s ({source})"
        record.done(record, None, JobTimedOut(message, record.timeout))
        if record.in_handler and self.on_overtime is not None:
            self.on_overtime(record)

    def _handler_returned(self, record: Running, result: Any, error: BaseException | None) -> None:
        self._end(record, self._outcome(record, record.job.payload, result, error))

    async def _run_intercepted(self, record: Running) -> None:
        """The interceptors' way: before hooks, the handler, after hooks, then the end."""
        job = record.job
        payload = job.payload
        outcome: Failure | None = None
        run = True
        if self.hooks.before_job_run_hooks:
            try:
                decision = await self.hooks.intercept_before_run(
                    BeforeJobRunContext(job, self.worker_id, payload)
                )
            except Exception as exc:
                decision = Fail(describe(exc))
            if isinstance(decision, Skip):
                self._end(record, None)
                return
            if isinstance(decision, Fail):
                outcome, run = self._failure(record, HookFailure(decision.message)), False
            elif isinstance(decision, Continue) and decision.payload is not UNCHANGED:
                payload = decision.payload
        if run:
            if self.hooks.has("job_start"):
                await self.hooks.emit("job_start", JobEvent(job, self.worker_id))
            ended: asyncio.Future[tuple[Any, BaseException | None]] = self.loop.create_future()

            def handler_ended(_record: Running, result: Any, error: BaseException | None) -> None:
                if not ended.done():
                    ended.set_result((result, error))

            self._launch(record, payload, handler_ended, None)
            result, error = await asyncio.shield(ended)
            outcome = self._outcome(record, payload, result, error)
        if self.hooks.after_job_run_hooks:
            error = outcome.exception if outcome is not None else None
            duration = time.monotonic() - record.started
            try:
                verdict = await self.hooks.intercept_after_run(
                    AfterJobRunContext(job, self.worker_id, error, duration)
                )
            except Exception as exc:
                verdict = Fail(describe(exc))
            if isinstance(verdict, Skip):
                outcome = None
            elif isinstance(verdict, Fail):
                outcome = self._failure(record, HookFailure(verdict.message))
        self._end(record, outcome)

    # -- ending -------------------------------------------------------------------------

    def _outcome(
        self, record: Running, payload: Any, result: Any, error: BaseException | None
    ) -> Failure | None:
        """What the handler's end means for the job: ``None`` on success, else the failure."""
        if error is not None:
            if record.cancelled and isinstance(
                error, (asyncio.CancelledError, concurrent.futures.CancelledError)
            ):
                error = ShutdownFailure(
                    f"Worker shutdown: job cancelled after the {self.grace:g} s grace period"
                )
            return self._failure(record, error)
        entry = self.tasks.get(record.job.task_identifier)
        if entry is None or not entry.is_batch:
            return None
        try:
            failure = batch_outcome(payload, result)
        except Exception as exc:
            return self._failure(record, exc)
        if failure is None:
            return None
        replacement = failure.payload if failure.payload is not None else UNCHANGED
        return self._failure(record, BatchItemsFailed(failure), replacement)

    def _failure(self, record: Running, error: BaseException, payload: Any = UNCHANGED) -> Failure:
        job = record.job
        return Failure(job.id, job, message_of(error), error, 0.0, payload)

    def _end(self, record: Running, outcome: Failure | None) -> None:
        """The one way a job ends: its slot freed, its outcome handed to the writer."""
        job = record.job
        if self.running.get(job.id) is record:
            del self.running[job.id]
            if record.timed_out and record.in_handler:
                # Failed at its time limit while its handler still runs: the slot stays
                # taken until the handler returns, so no more than ``concurrency`` run.
                key = record.overtime_key = next(self._overtime_keys)
                self.running[key] = record
        self.ended += 1
        self._ended_event.set()
        if record.abandoned:
            logger.warning(
                "job %d (%s) finished after the worker gave it up; its outcome is not written",
                job.id,
                job.task_identifier,
            )
        elif outcome is None:
            self.writer.complete(job, time.monotonic() - record.started)
        else:
            outcome.duration = time.monotonic() - record.started
            self.writer.fail(outcome)
        if self._starting:
            # Ended within start() (an eager task factory): its caller is filling slots,
            # so this slot is announced on the next turn of the loop, not re-entered.
            self.loop.call_soon(self.on_slot_free)
        else:
            self.on_slot_free()

    # -- taking back, cancelling, abandoning --------------------------------------------

    def take_back(self, older_than: float | None = None) -> list[Job]:
        """Jobs handed to the threads ahead of time that no thread has started yet."""
        which = None if older_than is None else (lambda args: args[0].fetched < older_than)
        jobs = []
        for args in self.threads.take_waiting(which):
            record: Running = args[0]
            if self.running.get(record.job.id) is record:
                del self.running[record.job.id]
            jobs.append(record.job)
        return jobs

    def oldest_fetch(self) -> float | None:
        """When the first job handed ahead to the threads was fetched (if any waits)."""
        if len(self.running) <= self.concurrency:
            return None
        return next(iter(self.running.values())).fetched

    async def wait(
        self, timeout: float, stop: asyncio.Event | None = None, *, one: bool = False
    ) -> None:
        """Wait until nothing runs, ``timeout`` passes, or ``stop`` is set.

        With ``one``, also return as soon as any job ends.
        """
        deadline = self.loop.time() + timeout
        ended = self.ended
        while self.running and not (stop is not None and stop.is_set()):
            if one and self.ended != ended:
                return
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            self._ended_event.clear()
            waits = [asyncio.ensure_future(self._ended_event.wait())]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()

    def cancel(self) -> None:
        """Ask every running job to stop: the signal for threads, cancellation for coroutines."""
        self.cancellation.set()
        for record in self.running.values():
            if record.signal is not None:
                record.signal.set()
            if self._cancel_handler(record):
                record.cancelled = True

    def abandon(self) -> list[Running]:
        """Give up every running job: its outcome will not be written by :meth:`_end`.

        Returns the jobs given up; not those already failed at their time limit, whose
        handlers merely run on.
        """
        records = list(self.running.values())
        for record in records:
            record.abandoned = True
            if record.timer is not None:
                record.timer.cancel()
                record.timer = None
            if record.task is not None:
                record.task.cancel()
        self.running.clear()
        return [record for record in records if record.overtime_key is None]

    def renew_cancellation(self) -> None:
        """A fresh signal for jobs started from now on (after a fence is lifted)."""
        self.cancellation = CancellationSignal()

    def close(self) -> None:
        """Release what the component holds."""
        self.threads.shutdown()


async def _guarded(awaitable: Any) -> Any:
    """Await a handler, turning ``KeyboardInterrupt``/``SystemExit`` into its job's failure.

    Raised inside a task they would stop the event loop, and the worker with it.
    """
    try:
        return await awaitable
    except (KeyboardInterrupt, SystemExit) as exc:
        raise HandlerExit.of(exc) from exc


async def _scoped(
    hooks: Hooks, job: Job, invoke: Callable[[Any, WorkerContext], Any], payload: Any, ctx: Any
) -> Any:
    """An ``async def`` handler inside the ``job_run_context`` managers."""
    with hooks.run_scope(job):
        return await invoke(payload, ctx)
