"""Readable progress for a terminal: jobs done, failed and the rate, from worker hooks."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from .hooks import Hooks

__all__ = ["Progress"]


class Progress:
    """Counts job outcomes through a :class:`Hooks` registry and reports them.

    ``attach(hooks)`` registers observers; :meth:`line` renders the current counts;
    :meth:`start` prints a line every ``interval`` seconds while jobs are being done
    (nothing while idle); :meth:`stop` prints the final summary.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.completed = 0
        self.failed = 0
        self.permanently_failed = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = (0, 0)

    def attach(self, hooks: Hooks) -> Hooks:
        """Register the counting observers on ``hooks`` (returned for chaining)."""
        hooks.on("job_complete")(self._on_complete)
        hooks.on("job_fail")(self._on_fail)
        hooks.on("job_permanently_fail")(self._on_permanent)
        return hooks

    def _on_complete(self, _event: Any) -> None:
        with self._lock:
            self.completed += 1

    def _on_fail(self, _event: Any) -> None:
        with self._lock:
            self.failed += 1

    def _on_permanent(self, _event: Any) -> None:
        with self._lock:
            self.failed += 1
            self.permanently_failed += 1

    def update(self, completed: int, failed: int, permanently_failed: int) -> None:
        """Set the counts (from elsewhere, such as the processes of a supervisor)."""
        with self._lock:
            self.completed = completed
            self.failed = failed
            self.permanently_failed = permanently_failed

    def line(self) -> str:
        """``N done, M failed (K for good), R jobs/s over T s``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = self.completed + self.failed
        permanent = f" ({self.permanently_failed} for good)" if self.permanently_failed else ""
        return (
            f"{self.completed} done, {self.failed} failed{permanent}, "
            f"{done / elapsed:,.0f} jobs/s over {elapsed:.1f} s"
        )

    def start(self) -> None:
        """Report every ``interval`` seconds in a background thread while jobs happen."""
        self.started = time.monotonic()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                counts = (self.completed, self.failed)
                if counts != self._reported:
                    self._reported = counts
                    print(f"progress: {self.line()}", file=self.stream, flush=True)

        self._thread = threading.Thread(target=loop, name="sqla_graphile-progress", daemon=True)
        self._thread.start()

    def stop(self, *, summary: bool = True) -> None:
        """Stop reporting and print the summary (unless ``summary`` is false)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if summary:
            print(f"summary: {self.line()}", file=self.stream, flush=True)
