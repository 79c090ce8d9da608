"""The supervised side of :mod:`sqla_graphile.supervisor`: a worker process's life.

Each process the supervisor starts runs :func:`child`: it builds its worker with the
factory, runs it, and publishes the worker's status and outcome counts on its
:class:`Board`, a structure in memory shared with the supervisor (which only reads it).
Its exit status tells the supervisor what happened: ``0``, ``1`` or ``57``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DatabaseNewerThanLibrary
from .worker.status import WorkerStatus

if TYPE_CHECKING:
    from .worker import Worker

__all__ = [
    "EXIT_BREAKING_MIGRATION",
    "EXIT_CRASHED",
    "EXIT_RECYCLED",
    "PUBLISH_INTERVAL",
    "STOP_SIGNALS",
    "Board",
    "WorkerSlot",
    "child",
    "status_of",
]

# The supervisor's logger: the processes' lines are part of its story.
logger = logging.getLogger("sqla_graphile.supervisor")

#: A worker process's status, and the supervisor's, when the worker schema holds a
#: breaking migration newer than this library (Node's): restarting cannot help.
EXIT_BREAKING_MIGRATION = 57
#: The supervisor's status when its processes kept dying (or one failed to stop cleanly).
EXIT_CRASHED = 1
#: A worker process's status when it stopped to be recycled: a ``def`` handler's thread
#: was still running its worker's ``overtime_limit`` after its job's time limit.
EXIT_RECYCLED = 58
#: What stops a worker (and the supervisor): passed on as SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How often a process publishes its status (and the supervisor looks at it).
PUBLISH_INTERVAL = 0.5
#: Room for a worker id on the board (longer ones are cut, for the log lines only).
_WORKER_ID_SIZE = 120


@dataclass(frozen=True)
class WorkerSlot:
    """Which of the supervised processes a factory builds its worker for."""

    index: int
    """The slot, from ``0`` to ``processes - 1``; a restarted process keeps its slot."""
    processes: int
    """How many processes the supervisor runs."""
    cron: bool
    """Whether this process schedules the crontab (slot 0 only); the supervisor empties
    the crontab of the others' workers."""


class Board(ctypes.Structure):
    """One slot's status, in memory shared with its process (which alone writes it)."""

    _fields_ = [
        ("updated", ctypes.c_double),  # time.monotonic() of the last publication; 0: none
        ("running", ctypes.c_bool),
        ("stopping", ctypes.c_bool),
        ("listen", ctypes.c_bool),
        ("listening", ctypes.c_bool),
        ("fenced", ctypes.c_bool),
        ("recovery", ctypes.c_bool),
        ("connected", ctypes.c_bool),
        ("heartbeat_age", ctypes.c_double),  # NaN: none
        ("heartbeat_interval", ctypes.c_double),  # NaN: none
        ("completed", ctypes.c_longlong),
        ("failed", ctypes.c_longlong),
        ("permanently_failed", ctypes.c_longlong),
        ("worker_id", ctypes.c_char * _WORKER_ID_SIZE),
    ]


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else value


def status_of(board: Board, now: float) -> WorkerStatus:
    age = _optional(board.heartbeat_age)
    return WorkerStatus(
        board.worker_id.decode("utf-8", "replace"),
        running=board.running,
        stopping=board.stopping,
        listen=board.listen,
        listening=board.listening,
        fenced=board.fenced,
        recovery=board.recovery,
        connected=board.connected,
        # As of now, not of the publication.
        heartbeat_age=None if age is None else age + max(0.0, now - board.updated),
        heartbeat_interval=_optional(board.heartbeat_interval),
    )


# -- the worker process ---------------------------------------------------------------------


class _Publisher:
    """Keeps a slot's board up to date from its worker: status and outcome counts."""

    def __init__(self, worker: Worker, board: Board) -> None:
        self.worker = worker
        self.board = board
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        board.worker_id = worker.worker_id.encode()[: _WORKER_ID_SIZE - 1]
        hooks = worker.hooks
        hooks.on("job_complete")(lambda _e: self._count("completed"))
        hooks.on("job_fail")(lambda _e: self._count("failed"))
        hooks.on("job_permanently_fail")(self._on_permanent)
        hooks.on("worker_start")(self._on_start)
        hooks.on("worker_stop")(self._on_stop)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.board, name, getattr(self.board, name) + 1)

    def _on_permanent(self, _event: Any) -> None:
        with self._lock:
            self.board.failed += 1
            self.board.permanently_failed += 1

    def publish(self) -> None:
        status = self.worker.status
        board = self.board
        board.running = status.running
        board.stopping = status.stopping
        board.listen = status.listen
        board.listening = status.listening
        board.fenced = status.fenced
        board.recovery = status.recovery
        board.connected = status.connected
        nan = float("nan")
        board.heartbeat_age = nan if status.heartbeat_age is None else status.heartbeat_age
        board.heartbeat_interval = (
            nan if status.heartbeat_interval is None else status.heartbeat_interval
        )
        board.updated = time.monotonic()  # last: the rest is in place when it moves

    async def _loop(self) -> None:
        # On the worker's loop: a board that stops moving shows that loop stuck.
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _on_start(self, _event: Any) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _on_stop(self, _event: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.publish()


def _watch_parent(worker: Worker) -> None:
    """Stop the worker gracefully if the supervisor dies (its sentinel closes)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.warning("the supervisor is gone: stopping worker %s", worker.worker_id)
        worker.request_shutdown(reason="supervisor gone")

    threading.Thread(target=watch, name="sqla_graphile-parent-watch", daemon=True).start()


def child(factory: Callable[[WorkerSlot], Worker], slot: WorkerSlot, boards: Any) -> None:
    """A worker process: build the worker, run it, exit 0, 1, 57 or 58."""
    from .worker import Worker
    from .worker.watchdog import HandlerStuck

    # Off the terminal's process group: a Ctrl-C reaches us once, through the supervisor.
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not POSIX
        os.setsid()
    if hasattr(signal, "pthread_sigmask"):
        # The supervisor blocked its stop signals while starting us; the mask is inherited.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    code = EXIT_CRASHED
    publisher: _Publisher | None = None
    try:
        worker = factory(slot)
        if not isinstance(worker, Worker):
            raise TypeError(f"the worker factory returned {type(worker).__name__}, not a Worker")
        if not slot.cron:
            worker.crontab = []
        worker._recycle_when_stuck = True  # a new process is the way to get a thread back
        publisher = _Publisher(worker, boards[slot.index])
        _watch_parent(worker)
        try:
            worker.run()
        finally:
            worker.close()
        code = 0
    except DatabaseNewerThanLibrary as exc:
        logger.error("%s", " ".join(str(exc).split()))
        code = EXIT_BREAKING_MIGRATION
    except HandlerStuck as exc:
        logger.warning("worker process %d recycled: %s", slot.index, exc)
        code = EXIT_RECYCLED
    except BaseException:
        logger.exception("worker process %d failed", slot.index)
    finally:
        if publisher is not None:
            publisher.publish()
    sys.exit(code)
