"""The operator's actions: what each asks for, what it says, and what it does.

Each action runs through :class:`~sqla_graphile.AsyncWorkerUtils` bound to the request's
transaction, so it does exactly what the same call does from Python or the CLI:

* ``reschedule``: run a job now (``reschedule_jobs`` without a run time);
* ``fail``: fail a job for good (``permanently_fail_jobs``), with a reason;
* ``complete``: delete a job as done (``complete_jobs``);
* ``remove``: remove the job with a key (``remove_job``);
* ``force_unlock``: release a worker's job and queue locks (``force_unlock_workers``);
* ``sweep``: recover the jobs of workers whose heartbeat is stale (``sweep_stale_workers``).

A job that is locked is left alone by the first three (the SQL functions' rule).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..recovery import SweepStaleWorkersOptions
from ..utils import AsyncWorkerUtils

__all__ = ["ACTIONS", "Action", "ActionError"]


class ActionError(ValueError):
    """An action's input is missing or malformed (answered with ``400``)."""


def _job_id(params: Mapping[str, str]) -> int:
    value = params.get("job_id", "")
    if not value.isdigit():
        raise ActionError("job_id must be a job's id (a whole number)")
    return int(value)


def _text(params: Mapping[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise ActionError(f"{name} is required")
    return value


def _jobs(done: list[object], job_id: int, verb: str) -> str:
    if done:
        return f"job {job_id} {verb}"
    return f"job {job_id} unchanged: it is locked by a worker or no longer exists"


async def _reschedule(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    job_id = _job_id(params)
    return _jobs(list(await utils.reschedule_jobs([job_id])), job_id, "rescheduled to run now")


async def _fail(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    job_id = _job_id(params)
    reason = params.get("reason") or f"failed from the dashboard by {operator}"
    done = await utils.permanently_fail_jobs([job_id], reason)
    return _jobs(list(done), job_id, "failed permanently")


async def _complete(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    job_id = _job_id(params)
    return _jobs(list(await utils.complete_jobs([job_id])), job_id, "completed (deleted)")


async def _remove(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    key = _text(params, "key")
    job = await utils.remove_job(key)
    if job is None:
        return f"no job has the key {key!r}"
    if job.is_locked:
        return f"job {job.id} (key {key!r}) is running: it will not be retried"
    return f"job {job.id} (key {key!r}) removed"


async def _force_unlock(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    worker_id = _text(params, "worker_id")
    await utils.force_unlock_workers([worker_id])
    return f"every lock of worker {worker_id!r} released"


async def _sweep(utils: AsyncWorkerUtils, params: Mapping[str, str], operator: str) -> str:
    result = await utils.sweep_stale_workers(SweepStaleWorkersOptions())
    if result.already_running:
        return "another sweep is running: nothing done"
    workers = ", ".join(result.worker_ids) or "none"
    return f"swept stale workers ({workers}): {result.recovered_count} jobs recovered"


@dataclass(frozen=True)
class Action:
    """One action: its title, the parameters naming its target, and what it does."""

    name: str
    title: str
    target: tuple[str, ...]
    """The query parameters naming what it acts on (``job_id``, ``key``, ``worker_id``)."""
    warning: str
    run: Callable[[AsyncWorkerUtils, Mapping[str, str], str], Awaitable[str]]
    reason: bool = False
    """Whether the confirmation form asks for a reason."""

    def describe(self, params: Mapping[str, str]) -> str:
        """What the action is about to do, for the confirmation page and the audit line."""
        named = ", ".join(f"{name} {params.get(name, '')!r}" for name in self.target)
        return f"{self.title}: {named}" if named else self.title


ACTIONS = {
    action.name: action
    for action in (
        Action(
            "reschedule",
            "Run now",
            ("job_id",),
            "The job becomes runnable at once (its attempts are kept).",
            _reschedule,
        ),
        Action(
            "fail",
            "Fail permanently",
            ("job_id",),
            "The job will not run again; it stays, failed, until removed or rescheduled.",
            _fail,
            reason=True,
        ),
        Action(
            "complete",
            "Complete",
            ("job_id",),
            "The job is deleted as if it had succeeded.",
            _complete,
        ),
        Action(
            "remove",
            "Remove by key",
            ("key",),
            "A waiting job with this key is deleted; a running one is not retried.",
            _remove,
        ),
        Action(
            "force_unlock",
            "Force-unlock worker",
            ("worker_id",),
            "Every job and queue this worker holds is released: if it is still alive, "
            "its jobs may run twice.",
            _force_unlock,
        ),
        Action(
            "sweep",
            "Sweep stale workers",
            (),
            "The jobs of registered workers whose heartbeat is stale are recovered.",
            _sweep,
        ),
    )
}
