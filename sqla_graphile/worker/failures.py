"""Why a job failed: the worker's own failure types and the ``last_error`` they become."""

from __future__ import annotations

import asyncio
import os
import traceback

from ..errors import JobTimedOut
from .tasks import BatchFailure, BatchJobError

__all__ = [
    "BatchItemsFailed",
    "HandlerExit",
    "HookFailure",
    "ShutdownFailure",
    "describe",
    "message_of",
]

# Characters of traceback kept in last_error after the message.
_TRACEBACK_CHARS = 1500


class HookFailure(Exception):
    """A job failed by an interceptor's ``Fail(message)``."""


class ShutdownFailure(Exception):
    """A job interrupted by the worker's shutdown."""


class BatchItemsFailed(Exception):
    """Some items of a batch job failed (see :class:`BatchFailure`)."""

    def __init__(self, failure: BatchFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class HandlerExit(RuntimeError):
    """A handler raised ``KeyboardInterrupt`` or ``SystemExit``: its job fails, nothing else."""

    @classmethod
    def of(cls, exc: BaseException) -> HandlerExit:
        """The failure standing for ``exc`` (its cause)."""
        error = cls(f"the handler raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error


def _own_files() -> tuple[str, ...]:
    return (os.path.dirname(__file__), os.path.dirname(asyncio.__file__))


_OWN_FILES = _own_files()


def describe(exc: BaseException) -> str:
    """``last_error`` for an exception: its concise message, then a trimmed traceback."""
    message = str(exc).strip() or type(exc).__name__
    name = "RuntimeError" if isinstance(exc, HandlerExit) else type(exc).__name__
    head = f"{name}: {message}"
    # The worker's own frames (and asyncio's) say nothing about the failure.
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(_OWN_FILES)
    ]
    if not frames:
        return head
    tail = "".join(traceback.format_list(frames[-4:]))
    if len(tail) > _TRACEBACK_CHARS:
        tail = "…" + tail[-_TRACEBACK_CHARS:]
    return f"{head}\n{tail.rstrip()}"


def message_of(error: BaseException) -> str:
    """``last_error`` for a job's failure."""
    if isinstance(
        error, (HookFailure, ShutdownFailure, BatchItemsFailed, BatchJobError, JobTimedOut)
    ):
        return str(error) or type(error).__name__
    return describe(error)
