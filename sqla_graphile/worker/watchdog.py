"""The watchdog of ``def`` handlers that run on past their job's time limit.

At a job's time limit its job is failed and its ``def`` handler signalled through
``ctx.cancellation``; nothing can stop a thread from outside, so a handler that ignores
the signal runs on and keeps its slot (and thread) until it returns. One still running
the worker's ``overtime_limit`` seconds after its time limit is *stuck*: the watchdog
logs it and :attr:`Worker.status <sqla_graphile.worker.Worker.status>` reports it (its
``/livez`` fails, so that an orchestrator restarts the process). A worker run by the
supervisor of ``graphile-worker run --processes`` stops gracefully instead, and its
process exits with :data:`~sqla_graphile.supervisor.EXIT_RECYCLED` to be started again:
a new process is the one way to get the thread back.

``async def`` handlers are not watched: they are cancelled at the limit, and one that
swallows the cancellation would not let its process exit either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from .executor import Executor, Running

__all__ = ["DEFAULT_OVERTIME_LIMIT", "HandlerStuck", "Watchdog"]

logger = logging.getLogger("sqla_graphile.worker")

#: Seconds a timed-out ``def`` handler may run on before it is taken for stuck.
DEFAULT_OVERTIME_LIMIT = 30.0


class HandlerStuck(Exception):
    """A handler thread still ran ``overtime`` seconds after its job's time limit.

    Raised by a worker's run only when it was told to stop for it (the supervisor's
    worker processes); a plain worker logs it and reports it in its status.
    """

    def __init__(self, job_id: int, task_identifier: str, overtime: float) -> None:
        super().__init__(
            f"a handler thread of job {job_id} (task {task_identifier!r}) was still "
            f"running {overtime:g} s after its time limit"
        )
        self.job_id = job_id
        self.task_identifier = task_identifier
        self.overtime = overtime


class Watchdog:
    """Watches the timed-out ``def`` handlers of ``executor`` that run on.

    ``limit``: the worker's ``overtime_limit`` (``None``: no watch). ``on_stuck``, when
    given, is called on the loop with the first stuck handler's :class:`HandlerStuck`
    (to stop the worker); without it a stuck handler is only logged and reported.
    """

    def __init__(
        self,
        executor: Executor,
        limit: float | None,
        *,
        on_stuck: Callable[[HandlerStuck], None] | None = None,
    ) -> None:
        self.executor = executor
        self.limit = limit
        self.on_stuck = on_stuck
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by id() of the record
        self._stuck: list[Running] = []
        self._stopped = False
        if limit is not None:
            executor.on_overtime = self.watch

    def watch(self, record: Running) -> None:
        """A job was failed at its time limit while its handler still runs."""
        entry = self.executor.tasks.get(record.job.task_identifier)
        if self.limit is None or self._stopped or entry is None or entry.is_async:
            return
        loop = self.executor.loop
        self._timers[id(record)] = loop.call_later(self.limit, self._check, record)

    def _check(self, record: Running) -> None:
        self._timers.pop(id(record), None)
        if not record.in_handler or self._stopped:
            return  # it returned in time
        assert self.limit is not None
        self._stuck = [other for other in self._stuck if other.in_handler]
        self._stuck.append(record)
        stuck = HandlerStuck(record.job.id, record.job.task_identifier, self.limit)
        if self.on_stuck is not None:
            logger.warning("%s: stopping the worker so that its process is recycled", stuck)
            self.on_stuck(stuck)
            return
        logger.warning(
            "%s; it holds a slot and a thread until it returns, and the worker reports "
            "itself not live (restart the process to get them back)",
            stuck,
        )

    @property
    def stuck_jobs(self) -> tuple[int, ...]:
        """The ids of the jobs whose handler is stuck now (from any thread)."""
        return tuple(record.job.id for record in list(self._stuck) if record.in_handler)

    def stop(self) -> None:
        """At shutdown: watch no more, and let the shutdown not wait for stuck handlers.

        Their jobs were failed long ago; their threads are daemons, which do not keep
        the process alive.
        """
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        running = self.executor.running
        for record in self._stuck:
            key = record.overtime_key
            if record.in_handler and key is not None and running.get(key) is record:
                del running[key]
                record.overtime_key = None
