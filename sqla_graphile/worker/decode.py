"""Fetched rows into :class:`~sqla_graphile.job.Job` objects, one bad row never the batch.

A row the worker cannot decode (a payload nested deeper than the JSON parser goes, a
timestamp outside Python's range) becomes a *poison* entry: its job is failed with a
clear ``last_error`` and the other jobs of the same fetch run as usual.
"""

from __future__ import annotations

import json
import json.scanner
import operator
from collections.abc import Callable, Sequence
from typing import Any

from ..job import Job
from .connection import UndecodableRow

__all__ = ["POISON_ERROR", "decode_jobs", "json_loads"]

#: ``last_error`` of a job whose row the worker could not decode, before the reason.
POISON_ERROR = "Job could not be decoded by the worker: "

_FETCH_ORDER = operator.attrgetter("priority", "run_at")

_scan_json: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]  # typeshed has its own class for it
)


def json_loads(text: str) -> Any:
    """``json.loads`` for the database's JSON text, minus its wrappers' cost.

    A whole document is parsed in one call of the scanner; anything else (whitespace
    around it, or an error to raise) goes to ``json.loads``.
    """
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _job(row: Sequence[Any], names: dict[int, str], loads: Callable[[str], Any]) -> Job:
    # fmt: off
    (
        id, queue, payload, priority, run_at, attempts, max_attempts, error,
        created, updated, key, locked_at, locked_by, revision, flags, task, queue_id,
    ) = row
    return Job(
        id, queue, names[task], loads(payload), priority, run_at, attempts,
        max_attempts, error, created, updated, key, locked_at, locked_by, revision,
        None if flags is None else frozenset(json.loads(flags)), task, queue_id,
    )
    # fmt: on


def decode_jobs(
    rows: Sequence[Any], names: dict[int, str], loads: Callable[[str], Any]
) -> tuple[list[Job], list[tuple[int, str]]]:
    """The jobs of a fetch's rows (columns as in ``FETCHED``) in start order, and poison.

    Poison entries are ``(job id, last_error)`` for rows that could not be decoded.
    """
    try:
        jobs = [_job(row, names, loads) for row in rows]
        poison: list[tuple[int, str]] = []
    except Exception:
        # Rare: decode row by row, keeping every good one.
        jobs, poison = [], []
        for row in rows:
            if isinstance(row, UndecodableRow):
                poison.append((row.id, _reason(row.error)))
                continue
            try:
                jobs.append(_job(row, names, loads))
            except (Exception, RecursionError) as exc:
                poison.append((row[0], _reason(exc)))
    if len(jobs) > 1:
        jobs.sort(key=_FETCH_ORDER)
    return jobs, poison


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return POISON_ERROR + detail
