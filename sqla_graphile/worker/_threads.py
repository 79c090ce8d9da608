"""A small pool of daemon threads running sync handlers for the event loop.

Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at interpreter
exit, so one handler stuck in a blocking call would keep a stopped worker's process alive
after its job was already failed and its writes done. Daemon threads let it exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["HandlerThreads"]

logger = logging.getLogger("sqla_graphile.worker")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class HandlerThreads:
    """``size`` daemon threads; :meth:`submit` returns an asyncio future of the call."""

    def __init__(self, size: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a thread; the future (of the running loop) gets its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((loop, future, fn, args))
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
            loop, future, fn, args = item
            try:
                result = fn(*args)
            except Exception as exc:
                _settle(loop, future, None, exc)
            except BaseException as exc:
                # SystemExit or KeyboardInterrupt raised by a handler must fail its job,
                # not stop the event loop that awaits the future.
                wrapped = RuntimeError(f"the handler raised {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                _settle(loop, future, None, wrapped)
            else:
                _settle(loop, future, result, None)
            del item, future, args


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    def apply() -> None:
        if future.done():  # cancelled meanwhile: the outcome no longer matters
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is closed: the worker is gone
        logger.debug("a handler finished after its worker's event loop closed")
