"""A small pool of daemon threads running sync handlers for the event loop.

Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at interpreter
exit, so one handler stuck in a blocking call would keep a stopped worker's process alive
after its job was already failed and its writes done. Daemon threads let it exit.

Results travel back in batches: a finished call is appended to a list that the loop
drains, and the loop is woken only when no drain is pending, so many short handlers
finishing together cost one wake-up of the loop instead of one each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Done", "HandlerThreads"]

logger = logging.getLogger("sqla_graphile.worker")

Done = Callable[[Any, "BaseException | None"], None]
"""``done(result, error)``: called on the loop when a call finishes."""

_Item = tuple[Callable[..., Any], tuple[Any, ...], Done, bool]


class HandlerThreads:
    """``size`` daemon threads serving the running loop (create it on the loop)."""

    def __init__(self, size: int, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._finished: deque[tuple[Done, Any, BaseException | None]] = deque()
        self._drain_pending = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done, *, takeable: bool = False
    ) -> None:
        """Run ``fn(*args)`` in a thread, then ``done(result, error)`` on the loop.

        ``takeable``: :meth:`take_waiting` may take the call back while no thread has
        started it (``done`` is then never called).
        """
        self._queue.put((fn, args, done, takeable))

    def take_waiting(
        self, which: Callable[[tuple[Any, ...]], bool] | None = None
    ) -> list[tuple[Any, ...]]:
        """Take back the takeable calls no thread has started yet; their ``args``.

        Only those whose ``args`` satisfy ``which``, if given. Call it on the loop.
        """
        taken: list[tuple[Any, ...]] = []
        kept: list[_Item | None] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[3] and (which is None or which(item[1])):
                taken.append(item[1])
            else:
                kept.append(item)
        for item in kept:
            self._queue.put(item)
        return taken

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a thread; the returned future gets its result."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.done():  # cancelled meanwhile: the outcome no longer matters
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.call(fn, args, done)
        return future

    def shutdown(self) -> None:
        """Let idle threads exit; threads still inside a handler finish it first."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, done, _ = item
            try:
                result = fn(*args)
            except Exception as exc:
                self._settle(done, None, exc)
            except BaseException as exc:
                # SystemExit or KeyboardInterrupt raised by a handler must fail its job,
                # not stop the event loop that awaits it.
                wrapped = RuntimeError(f"the handler raised {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                self._settle(done, None, wrapped)
            else:
                self._settle(done, result, None)
            del item, fn, args, done

    def _settle(self, done: Done, result: Any, error: BaseException | None) -> None:
        self._finished.append((done, result, error))
        if self._drain_pending:
            return  # the pending drain (which clears the flag before it reads) takes it
        self._drain_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the worker is gone
            logger.debug("a handler finished after its worker's event loop closed")

    def _drain(self) -> None:
        self._drain_pending = False
        finished = self._finished
        while finished:
            done, result, error = finished.popleft()
            try:
                done(result, error)
            except Exception:  # a bug in the worker; never lose the other results
                logger.exception("handling a handler's result failed")
