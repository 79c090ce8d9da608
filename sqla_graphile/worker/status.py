"""``WorkerStatus``: what a running worker says of itself (``Worker.status``).

Published as :class:`sqla_graphile.health.WorkerStatus`, beside the endpoint that serves
it; defined here, with the worker, which builds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["HEARTBEAT_FRESHNESS", "WorkerStatus"]

#: A heartbeat is fresh while its age is at most this many heartbeat intervals: one
#: missed beat is tolerated, two are not.
HEARTBEAT_FRESHNESS = 2.0


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of a worker's health; cheap to read, from any thread.

    ``heartbeat_age`` counts from the moment the last successful heartbeat was sent
    (by this process's monotonic clock); ``None`` without recovery or before the first.
    """

    worker_id: str
    running: bool
    """Started (past its checks and registration) and not yet stopped."""
    stopping: bool
    """A shutdown was requested (a signal, ``request_shutdown()``, a breaking migration)."""
    listen: bool
    """The worker is meant to hold a ``LISTEN`` connection (its ``listen`` option)."""
    listening: bool
    """Its ``LISTEN`` connection is established right now."""
    fenced: bool
    """Its heartbeats failed for longer than its lease: it runs nothing until one succeeds."""
    recovery: bool
    """Crash recovery is on for this run (registration, heartbeats, sweeps)."""
    connected: bool
    """Its last database statement succeeded (none has failed since)."""
    heartbeat_age: float | None = None
    heartbeat_interval: float | None = None
    stuck_jobs: tuple[int, ...] = ()
    """Jobs whose ``def`` handler still runs ``overtime_limit`` seconds past their time
    limit (they were failed then): each holds a slot and a thread that only a restart of
    the process gets back."""
    idle: bool = False
    """Waiting for work: no job running or queued locally, no fetch under way or due; a
    notification (or the poll interval) is what starts the next fetch."""
    fetch_session: int | None = None
    """The server process id (``pg_stat_activity.pid``) of the connection the worker holds
    for fetching; ``None`` when it holds none (a pool too small to spare one)."""

    @property
    def live(self) -> bool:
        """Whether the worker should be left running: not fenced, no handler stuck."""
        return not self.fenced and not self.stuck_jobs

    @property
    def heartbeat_fresh(self) -> bool:
        """With recovery: the last heartbeat is at most two intervals old."""
        if not self.recovery:
            return True
        if self.heartbeat_age is None or self.heartbeat_interval is None:
            return False
        return self.heartbeat_age <= HEARTBEAT_FRESHNESS * self.heartbeat_interval

    def problems(self) -> list[str]:
        """Why the worker is not ready, one phrase each; empty when it is."""
        found: list[str] = []
        if self.stopping:
            found.append("shutting down")
        elif not self.running:
            found.append("not running")
        if self.fenced:
            found.append("fenced: its heartbeats failed for longer than its lease")
        if self.stuck_jobs:
            jobs = ", ".join(map(str, self.stuck_jobs))
            found.append(f"handler thread stuck past its time limit (job {jobs})")
        if self.running and not self.stopping:
            if not self.connected:
                found.append("its database statements are failing")
            if self.listen and not self.listening:
                found.append("not listening for notifications")
            if not self.heartbeat_fresh:
                age = "none yet" if self.heartbeat_age is None else f"{self.heartbeat_age:.1f} s"
                found.append(f"heartbeat not fresh (last: {age})")
        return found

    @property
    def ready(self) -> bool:
        """Running, connected, listening (if it does), heartbeating; not fenced, stopping, stuck."""
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        """The fields, ``live``, ``ready`` and ``problems``, as JSON-ready values."""
        data = asdict(self)
        data.update(live=self.live, ready=self.ready, problems=self.problems())
        return data
