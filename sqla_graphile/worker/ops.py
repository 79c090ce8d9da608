"""The worker's statements other than its fetch, as operations (:mod:`sqla_graphile._drive`).

Each is written like the utils' operations: it yields a statement of
:mod:`sqla_graphile.sql` with its parameters and reads the ``Result``. The worker drives
them on its held connections (:meth:`Database.drive
<sqla_graphile.worker.connection.Database.drive>`), with its time limits and retries;
any other driver runs them the same way. The fetch itself stays a direct statement on
the fetcher's connection: its rows go straight to the job decoder (and, for the idle
worker, through the quick fetch's prepared statement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Result

from .._drive import Op
from ..sql import statements

__all__ = [
    "claim_keyed_op",
    "complete_op",
    "fail_op",
    "reclaim_op",
    "register_tasks_op",
    "return_jobs_op",
    "sweep_locks_op",
    "task_ids_op",
    "written_op",
]


def register_tasks_op(schema: str, identifiers: Sequence[str]) -> Op[None]:
    """Give each task its row (only missing ones are inserted)."""
    yield statements(schema).adding.register_tasks, {"identifiers": list(identifiers)}


def task_ids_op(schema: str, identifiers: Sequence[str]) -> Op[dict[int, str]]:
    """The tasks' current ids, with their identifiers."""
    result = yield statements(schema).adding.task_ids, {"identifiers": list(identifiers)}
    return {row[0]: row[1] for row in _rows(result)}


def claim_keyed_op(schema: str, worker_id: str, ids: Sequence[int]) -> Op[set[int]]:
    """Of keyed jobs queued locally, the ids still ours to start (detached ones deleted)."""
    result = yield statements(schema).worker.claim_keyed, {"worker_id": worker_id, "ids": ids}
    return set(result.scalars())


def return_jobs_op(schema: str, worker_id: str, ids: Sequence[int]) -> Op[dict[int, bool]]:
    """Give back unstarted jobs; each released id, with whether it was deleted instead."""
    result = yield statements(schema).worker.return_jobs, {"worker_id": worker_id, "ids": ids}
    return {row[0]: row[1] for row in _rows(result)}


def reclaim_op(schema: str, worker_id: str, known: Sequence[int]) -> Op[list[int]]:
    """Give back every row locked under ``worker_id`` but not ``known``; their ids."""
    result = yield statements(schema).worker.reclaim, {"worker_id": worker_id, "known": known}
    return [row[0] for row in _rows(result)]


def complete_op(schema: str, worker_id: str, ids: Sequence[int]) -> Op[dict[int, Any]]:
    """Delete the completed jobs still ours; the rows written (id, queue id) by id."""
    result = yield statements(schema).worker.complete, {"worker_id": worker_id, "ids": ids}
    return {row[0]: row for row in _rows(result)}


def fail_op(
    schema: str,
    worker_id: str,
    ids: Sequence[int],
    messages: Sequence[str],
    payloads: Sequence[str | None],
) -> Op[dict[int, Any]]:
    """Record failed attempts of jobs still ours (``payloads``: new JSON, or ``None``).

    Returns the rows written (id, attempts, max_attempts, run_at) by id.
    """
    params = {"worker_id": worker_id, "ids": ids, "messages": messages, "payloads": payloads}
    result = yield statements(schema).worker.fail, params
    return {row[0]: row for row in _rows(result)}


def written_op(schema: str, ids: Sequence[int]) -> Op[dict[int, Any]]:
    """The rows (id, locked_by, last_error) of ``ids`` that still exist, by id."""
    result = yield statements(schema).worker.written, {"ids": ids}
    return {row[0]: row for row in _rows(result)}


def sweep_locks_op(schema: str) -> Op[tuple[int, int]]:
    """Node's 4-hour rule: unlock expired jobs and queues; how many of each."""
    result = yield statements(schema).worker.sweep, {}
    (jobs, queues), *_ = _rows(result)
    return int(jobs), int(queues)


def _rows(result: Result[Any]) -> Sequence[Sequence[Any]]:
    """The rows of ``result``, read by position."""
    return result.all()
