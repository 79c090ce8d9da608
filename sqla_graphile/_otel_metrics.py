"""The job metrics of :mod:`sqla_graphile.otel`.

Shared by every instrumentation on one meter provider; imported through
:mod:`sqla_graphile.otel` (the ``otel`` extra).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterable
from typing import Any, TypeAlias

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

from ._version import __version__

_NAME = "sqla_graphile"

#: Bucket boundaries (seconds) of ``graphile_worker.job.duration``.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Bucket boundaries of the fetch and write batch-size histograms.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_A_JOB_ID = "graphile_worker.job.id"
_A_TASK = "graphile_worker.job.task_identifier"
_A_QUEUE = "graphile_worker.job.queue_name"
_A_ATTEMPT = "graphile_worker.job.attempt"
_A_OUTCOME = "graphile_worker.job.outcome"
_A_COUNT = "graphile_worker.job.count"

_COUNTERS = {
    "added": "Jobs added through instrumented utils",
    "started": "Job handlers started",
    "completed": "Jobs completed",
    "failed": "Failed job attempts (retried and permanently failed)",
    "retried": "Failed job attempts that will be tried again",
    "permanently_failed": "Failed job attempts that were the job's last",
    "lock_lost": "Job outcomes not written because the job's lock was no longer held",
}

_Key: TypeAlias = tuple[str, "str | None"]
_Attributes: TypeAlias = dict[str, Any]
# -- metrics shared by every instrumentation on one meter provider ------------------------


# Each counter's place in a tally (a list of counts, one per task and queue).
_PLACES = {name: place for place, name in enumerate(_COUNTERS)}
ADDED = _PLACES["added"]
STARTED = _PLACES["started"]
COMPLETED = _PLACES["completed"]
FAILED = _PLACES["failed"]
RETRIED = _PLACES["retried"]
PERMANENTLY_FAILED = _PLACES["permanently_failed"]
LOCK_LOST = _PLACES["lock_lost"]


class _JobMetrics:
    """The job instruments of one meter provider.

    Counters are observable: each thread counts in tallies of its own, without a lock
    (a fraction of a microsecond, cheap enough to count every job of a busy worker),
    and a collection reports their sums. A histogram's ``record`` costs the SDK
    microseconds, as much as a no-op job's whole run: durations are recorded for the
    runs chosen by ``sample_runs`` only.
    """

    def __init__(self, meter: Meter) -> None:
        self._local = threading.local()
        # Every thread's tallies, by task and queue; a thread only ever writes its own.
        self._tallies: list[dict[_Key, list[int]]] = []
        self._tallies_lock = threading.Lock()
        self._attributes: dict[tuple[str, str | None, str | None], _Attributes] = {}
        for name, description in _COUNTERS.items():
            meter.create_observable_counter(
                f"graphile_worker.jobs.{name}",
                callbacks=[functools.partial(self._observe, _PLACES[name])],
                unit="{job}",
                description=description,
            )
        self.duration = meter.create_histogram(
            "graphile_worker.job.duration",
            unit="s",
            description="Seconds each job run took, by outcome (the runs sample_runs chose)",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.fetch_size = meter.create_histogram(
            "graphile_worker.fetch.size",
            unit="{job}",
            description="Jobs locked by each fetch statement",
            explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS),
        )
        self.write_size = meter.create_histogram(
            "graphile_worker.write.size",
            unit="{job}",
            description="Job outcomes written by each statement, by outcome",
            explicit_bucket_boundaries_advisory=list(SIZE_BUCKETS),
        )

    def tally(self, key: _Key) -> list[int]:
        """The calling thread's counts for a task and queue (indexed by ``ADDED`` ...)."""
        try:
            mine: dict[_Key, list[int]] = self._local.tallies
        except AttributeError:
            mine = self._local.tallies = {}
            with self._tallies_lock:
                self._tallies.append(mine)
        found = mine.get(key)
        if found is None:
            found = mine[key] = [0] * len(_COUNTERS)
        return found

    def attributes(self, key: _Key, outcome: str | None = None) -> _Attributes:
        """The (cached) attribute dict of a task, queue and optional outcome."""
        full = (key[0], key[1], outcome)
        found = self._attributes.get(full)
        if found is None:
            found = {"task": key[0]}
            if key[1] is not None:
                found["queue"] = key[1]
            if outcome is not None:
                found["outcome"] = outcome
            self._attributes[full] = found
        return found

    def _observe(self, place: int, _options: CallbackOptions) -> Iterable[Observation]:
        with self._tallies_lock:
            tallies = list(self._tallies)
        sums: dict[_Key, int] = {}
        for tally in tallies:
            # A copy is taken at once (no other thread runs meanwhile): the owner may be
            # adding keys while this sums.
            for key, counts in list(tally.items()):
                sums[key] = sums.get(key, 0) + counts[place]
        # A series appears with its first count (a tally holds every counter of its key).
        return [Observation(value, self.attributes(key)) for key, value in sums.items() if value]


_job_metrics: weakref.WeakKeyDictionary[Any, _JobMetrics] = weakref.WeakKeyDictionary()
_job_metrics_lock = threading.Lock()


def _metrics_for(provider: MeterProvider) -> _JobMetrics:
    with _job_metrics_lock:
        found = _job_metrics.get(provider)
        if found is None:
            found = _job_metrics[provider] = _JobMetrics(provider.get_meter(_NAME, __version__))
        return found
