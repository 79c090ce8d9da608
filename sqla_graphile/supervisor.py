"""Several worker processes on one host, supervised (``graphile-worker run --processes N``).

A :class:`Supervisor` starts ``processes`` worker processes with :mod:`multiprocessing`'s
*spawn* start method (a fresh interpreter each: no state forked from the parent, on
every platform) and builds each one's :class:`~sqla_graphile.worker.Worker` there by
calling the given factory with a :class:`WorkerSlot`. Each process is one worker with
its own worker id (registered for crash recovery like any worker), so a CPU-bound
application uses every core despite the GIL. Then:

* **A process that dies is started again**, in the same slot, after an exponential
  backoff (``restart_delay`` doubled per consecutive death of that slot, up to
  ``max_restart_delay``; a slot whose process had run for ``crash_window`` starts from
  ``restart_delay`` again). Each death is logged with its exit status or signal. The
  jobs a killed process held are recovered as any dead worker's: by a sibling's sweep,
  ``sweep_threshold + sweep_interval`` at most after its last heartbeat.
* **More than ``max_crashes`` deaths within ``crash_window`` seconds** (all slots
  together) stop every process gracefully, and :meth:`Supervisor.run` returns ``1``.
* **A process with a stuck handler thread is recycled**: a ``def`` handler still running
  its worker's ``overtime_limit`` (30 s by default) after its job's time limit cannot be
  stopped, and holds a slot and a thread. Its worker then stops gracefully (the other
  jobs get the usual grace period; the stuck thread is not waited for) and its process
  exits with status 58 (:data:`EXIT_RECYCLED`); it is started again at once, without
  backoff, and not counted as a death towards ``max_crashes`` (each recycle follows a
  job failed at its time limit, so it cannot loop faster than jobs time out).
* **A process exiting with status 57** (a breaking migration newer than this library)
  is not restarted: every process is stopped and ``run`` returns ``57``.
* **SIGTERM or SIGINT** to the supervisor is passed on to every process as a SIGTERM (a
  second one as well, which forces their shutdown); the supervisor returns once they have all
  exited: ``0`` when each stopped cleanly. Each worker bounds its own shutdown
  (``shutdown_grace_period + 3 × statement_timeout + 1`` seconds), so the supervisor's
  ends at most a moment after that bound. The processes run in their own sessions, so a
  Ctrl-C in a terminal reaches them once, through the supervisor. A process whose
  supervisor dies (``kill -9``) shuts down gracefully by itself.
* **Cron runs in one process only**: slot 0 keeps the worker's crontab, the others run
  none. When slot 0 dies, nothing is scheduled until it is back; minutes missed
  meanwhile are caught up by the items' backfill (``?fill=``), as after any restart.

The factory and its arguments are pickled to each process: use a module-level function
(or an instance of a module-level class), and start the supervisor under ``if __name__
== "__main__":`` in a script, as the spawn start method requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._backoff import Backoff

# The worker processes' side, in a module of its own; the public names are this one's.
from ._supervised import (
    EXIT_BREAKING_MIGRATION,
    EXIT_CRASHED,
    EXIT_RECYCLED,
    PUBLISH_INTERVAL,
    STOP_SIGNALS,
    Board,
    WorkerSlot,
    child,
    status_of,
)
from .health import DEFAULT_HEALTH_HOST, HealthServer, bind_health_socket

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from .progress import Progress
    from .worker import Worker

__all__ = [
    "EXIT_BREAKING_MIGRATION",
    "EXIT_CRASHED",
    "EXIT_RECYCLED",
    "Supervisor",
    "WorkerSlot",
    "describe_exit",
    "run_processes",
]

logger = logging.getLogger("sqla_graphile.supervisor")

#: A running process whose status is older than this has a stuck event loop.
_STALL_LIMIT = 10.0


def describe_exit(exitcode: int | None) -> str:
    """``exited with status 3`` or ``killed by signal SIGKILL (9)``."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {name} ({-exitcode})"
    return f"exited with status {exitcode}"


# -- the supervisor -------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    process: SpawnProcess | None = None
    started: float = 0.0
    deaths: int = 0  # consecutive deaths, for the backoff
    restart_at: float | None = None
    #: Outcome counts of this slot's earlier processes.
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])


class Supervisor:
    """Runs ``processes`` worker processes built by ``factory``, restarting those that die.

    ``factory(slot)`` is called in each new process and returns the
    :class:`~sqla_graphile.worker.Worker` it runs (with the default, random worker id, or
    one unique per process); the behaviour is described in :mod:`sqla_graphile.supervisor`.

    ``health_port`` serves ``/livez`` and ``/readyz`` for the whole group on
    ``health_host``:``health_port`` (bound here: ``OSError`` if it is taken) while
    :meth:`run` runs: live unless a process is fenced or its event loop has not
    answered for 10 s; ready when every slot runs a ready worker and no shutdown has
    begun. ``progress`` (a :class:`~sqla_graphile.progress.Progress`) is
    kept up to date with the outcome counts of every process.
    """

    def __init__(
        self,
        factory: Callable[[WorkerSlot], Worker],
        processes: int,
        *,
        max_crashes: int = 5,
        crash_window: float = 60.0,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        health_port: int | None = None,
        health_host: str = DEFAULT_HEALTH_HOST,
        progress: Progress | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        if max_crashes < 0:
            raise ValueError("max_crashes must be 0 or more")
        try:
            pickle.dumps(factory)
        except Exception as exc:
            raise TypeError(
                "the worker factory is sent to each worker process, so it must be picklable "
                "(a module-level function, or an instance of a module-level class): "
                f"{exc}"
            ) from None
        if crash_window <= 0 or restart_delay < 0 or max_restart_delay < restart_delay:
            raise ValueError(
                "crash_window must be positive, and 0 <= restart_delay <= max_restart_delay"
            )
        self.factory = factory
        self.processes = processes
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.health_port = health_port
        self.health_host = health_host
        self.progress = progress
        self.restarts = 0
        """Processes started again after a death."""
        self.exit_code: int | None = None
        """What :meth:`run` returned (``None`` before it did)."""
        self.failure: str | None = None
        """Why :meth:`run` returned a non-zero status, in a phrase."""
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(processes)]
        self._boards: Any = None
        self._lock = threading.Lock()
        self._deaths: deque[float] = deque()
        self._signals: list[int] = []
        self._stopping = False
        self._wake_read, self._wake_write = -1, -1
        self._health: _HealthThread | None = None
        if health_port is not None:
            # Bound now: a port in use is an error here, not a probe failing later.
            sock = bind_health_socket(health_host, health_port)
            self._health = _HealthThread(HealthServer(self._probe, sock))

    # -- control ----------------------------------------------------------------------

    def request_shutdown(self, sig: int = signal.SIGTERM) -> None:
        """Stop every process gracefully, as SIGTERM does (from any thread)."""
        self._signals.append(sig)
        self._wake()

    @property
    def counts(self) -> tuple[int, int, int]:
        """Jobs completed, failed, and failed for good, by every process so far."""
        totals = [0, 0, 0]
        with self._lock:
            for slot in self._slots:
                for i in range(3):
                    totals[i] += slot.counts[i]
                if self._boards is not None:  # the current (or last) process's counts
                    board = self._boards[slot.index]
                    totals[0] += board.completed
                    totals[1] += board.failed
                    totals[2] += board.permanently_failed
        return totals[0], totals[1], totals[2]

    # -- the run ----------------------------------------------------------------------

    def run(self) -> int:
        """Start the processes and supervise them until they stop; return the exit status.

        ``0`` after a clean stop, ``1`` (:data:`EXIT_CRASHED`) when processes kept dying
        or one did not stop cleanly, ``57`` (:data:`EXIT_BREAKING_MIGRATION`) on a
        breaking migration. Called from the main thread it handles SIGINT and SIGTERM;
        elsewhere, stop it with :meth:`request_shutdown`.
        """
        if self._boards is not None:
            raise RuntimeError("this supervisor has already run")
        self._boards = self._context.RawArray(Board, self.processes)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        restore = self._install_signals()
        try:
            if self._health is not None:
                self._health.start()
                host, port = self._health.server.address
                logger.info("health endpoint on http://%s:%d (/livez, /readyz)", host, port)
            logger.info(
                "starting %d worker processes (pid %d supervises them)",
                self.processes,
                os.getpid(),
            )
            for slot in self._slots:
                self._spawn(slot)
            self._supervise()
        finally:
            restore()
            if self._health is not None:
                self._health.stop()
            for slot in self._slots:  # only after an error of the supervisor itself
                process = slot.process
                if process is not None and process.is_alive():
                    process.kill()
                    process.join()
            os.close(self._wake_read)
            os.close(self._wake_write)
        code = self.exit_code if self.exit_code is not None else 0
        self.exit_code = code
        return code

    def _supervise(self) -> None:
        while True:
            self._handle_signals()
            now = time.monotonic()
            for slot in self._slots:
                process = slot.process
                if process is not None and process.exitcode is not None:
                    self._reaped(slot, process, now)
            live = [slot.process for slot in self._slots if slot.process is not None]
            if self._stopping and not live:
                return
            if not self._stopping:
                for slot in self._slots:
                    if (
                        slot.process is None
                        and slot.restart_at is not None
                        and slot.restart_at <= now
                    ):
                        self._spawn(slot)
                        self.restarts += 1
            self._report()
            waits = [
                slot.restart_at - now
                for slot in self._slots
                if slot.process is None and slot.restart_at is not None and not self._stopping
            ]
            timeout = max(0.0, min([PUBLISH_INTERVAL, *waits]))
            sentinels: list[Any] = [p.sentinel for p in live if p is not None]
            ready = multiprocessing.connection.wait([*sentinels, self._wake_read], timeout)
            if self._wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 512)

    def _spawn(self, slot: _Slot) -> None:
        board = self._boards[slot.index]
        with self._lock:
            slot.counts = [
                slot.counts[0] + board.completed,
                slot.counts[1] + board.failed,
                slot.counts[2] + board.permanently_failed,
            ]
            ctypes.memset(ctypes.addressof(board), 0, ctypes.sizeof(board))
        info = WorkerSlot(slot.index, self.processes, cron=slot.index == 0)
        process = self._context.Process(
            target=child,
            args=(self.factory, info, self._boards),
            name=f"sqla_graphile-worker-{slot.index}",
        )
        # The process starts with SIGINT ignored (until its worker handles it), so a
        # Ctrl-C before it leaves the terminal's process group does not interrupt it;
        # meanwhile the supervisor's own stop signals wait, blocked, not lost.
        main = threading.current_thread() is threading.main_thread()
        masks = hasattr(signal, "pthread_sigmask")
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if masks else None
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            process.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        with self._lock:
            slot.process = process
            slot.started = time.monotonic()
            slot.restart_at = None
        logger.info(
            "worker process %d started (pid %s)%s",
            slot.index,
            process.pid,
            ", with the crontab" if info.cron else "",
        )

    def _reaped(self, slot: _Slot, process: SpawnProcess, now: float) -> None:
        board = self._boards[slot.index]
        worker_id = board.worker_id.decode("utf-8", "replace") or "not built yet"
        code, pid = process.exitcode, process.pid
        with self._lock:
            slot.process = None
        process.join()
        process.close()
        what = f"worker process {slot.index} (pid {pid}, worker {worker_id})"
        if self._stopping:
            if code in (0, EXIT_RECYCLED, -signal.SIGTERM, -signal.SIGINT):
                logger.info("%s stopped", what)
            elif code == EXIT_BREAKING_MIGRATION:
                self.exit_code = EXIT_BREAKING_MIGRATION
                self.failure = f"{what} {describe_exit(code)}: a breaking migration"
                logger.error(
                    "%s %s: a breaking migration newer than this library", what, describe_exit(code)
                )
            else:
                logger.error("%s %s while stopping", what, describe_exit(code))
                if self.exit_code is None:
                    self.exit_code = EXIT_CRASHED
                    self.failure = f"{what} {describe_exit(code)} while stopping"
            return
        if code == EXIT_BREAKING_MIGRATION:
            logger.error(
                "%s %s: the worker schema has a breaking migration newer than this library; "
                "stopping every worker process (upgrade sqla-graphile, then start again)",
                what,
                describe_exit(code),
            )
            self.exit_code = EXIT_BREAKING_MIGRATION
            self.failure = f"{what} {describe_exit(code)}: a breaking migration"
            self._begin_stop()
            return
        if code == EXIT_RECYCLED:
            # A clean stop on purpose, not a crash: started again at once.
            slot.deaths = 0
            slot.restart_at = now
            logger.warning(
                "%s recycled (%s: a handler thread stuck past its time limit); restarting it now",
                what,
                describe_exit(code),
            )
            return
        ran = now - slot.started
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.crash_window:
            self._deaths.popleft()
        if len(self._deaths) > self.max_crashes:
            logger.error(
                "%s %s after %.1f s: %d worker process deaths within %g s, more than %d; "
                "stopping every worker process",
                what,
                describe_exit(code),
                ran,
                len(self._deaths),
                self.crash_window,
                self.max_crashes,
            )
            self.exit_code = EXIT_CRASHED
            self.failure = (
                f"{len(self._deaths)} worker process deaths within {self.crash_window:g} s "
                f"(the last: {what} {describe_exit(code)})"
            )
            self._begin_stop()
            return
        slot.deaths = 1 if ran >= self.crash_window else slot.deaths + 1
        restarts = Backoff(self.restart_delay, 2.0, self.max_restart_delay, jitter=(1.0, 1.0))
        delay = restarts.delay(slot.deaths)
        slot.restart_at = now + delay
        logger.warning(
            "%s %s after %.1f s; restarting it in %.1f s", what, describe_exit(code), ran, delay
        )

    # -- signals ----------------------------------------------------------------------

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: stop the supervisor with request_shutdown()")
            return lambda: None

        def handler(signum: int, _frame: Any) -> None:
            self._signals.append(signum)
            self._wake()

        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_write, b"\0")

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            name = signal.Signals(sig).name
            if not self._stopping:
                logger.info(
                    "%s received: stopping the worker processes gracefully (again to force)", name
                )
            else:
                logger.warning("%s received again: forcing the worker processes' shutdown", name)
            self._begin_stop()

    def _begin_stop(self) -> None:
        """Send SIGTERM to every process (again: their shutdown is forced)."""
        self._stopping = True
        for slot in self._slots:
            process = slot.process
            if process is not None and process.exitcode is None and process.pid is not None:
                # SIGTERM whatever was received: a process still starting ignores SIGINT
                # (so that a Ctrl-C cannot interrupt it), while SIGTERM ends it there.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    # -- reporting --------------------------------------------------------------------

    def _report(self) -> None:
        if self.progress is not None:
            self.progress.update(*self.counts)

    def _probe(self, kind: str) -> tuple[bool, dict[str, Any]]:
        """Called from the health thread: the group's liveness or readiness."""
        now = time.monotonic()
        entries: list[dict[str, Any]] = []
        live, ready = True, not self._stopping
        with self._lock:
            for slot in self._slots:
                process = slot.process
                entry: dict[str, Any] = {"index": slot.index, "pid": None, "state": "restarting"}
                if process is not None and process.exitcode is None:
                    board = self._boards[slot.index]
                    entry["pid"] = process.pid
                    if board.updated == 0:
                        entry["state"] = "starting"
                        ready = False
                    else:
                        status = status_of(board, now)
                        stalled = now - board.updated > _STALL_LIMIT
                        entry.update(status.as_dict())
                        entry["state"] = "stalled" if stalled else "running"
                        live = live and status.live and not stalled
                        ready = ready and status.ready and not stalled
                else:
                    ready = False
                entries.append(entry)
        ok = live if kind == "live" else ready
        body = {
            "status": "ok" if ok else "unavailable",
            "stopping": self._stopping,
            "processes": entries,
        }
        return ok, body


class _HealthThread:
    """A :class:`HealthServer` on a loop of its own, in a daemon thread."""

    def __init__(self, server: HealthServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sqla_graphile-health", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.start()
            self._ready.set()
            await self._stop.wait()
            await self.server.close()

        try:
            asyncio.run(serve())
        finally:
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5.0)


def run_processes(factory: Callable[[WorkerSlot], Worker], processes: int, **options: Any) -> int:
    """Run a :class:`Supervisor` of ``processes`` workers built by ``factory``; blocks.

    ``options`` are :class:`Supervisor`'s. Returns the exit status (``0``, ``1`` or
    ``57``), for ``sys.exit(run_processes(...))``.
    """
    return Supervisor(factory, processes, **options).run()
