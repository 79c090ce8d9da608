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

from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    MeterProvider,
    Observation,
)

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


class _JobMetrics:
    """The job instruments of one meter provider.

    Counters are observable: events add to plain totals (a fraction of a microsecond,
    cheap enough to count every job of a busy worker) and the totals are reported at
    each collection. A histogram's ``record`` costs the SDK microseconds, as much as a
    no-op job's whole run: durations are recorded for the runs chosen by
    ``sample_runs`` only.
    """

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, dict[_Key, int]] = {name: {} for name in _COUNTERS}
        self._attributes: dict[tuple[str, str | None, str | None], _Attributes] = {}
        for name, description in _COUNTERS.items():
            meter.create_observable_counter(
                f"graphile_worker.jobs.{name}",
                callbacks=[functools.partial(self._observe, name)],
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

    def add(self, name: str, key: _Key, amount: int = 1) -> None:
        """Count ``amount`` under ``name`` for a task and queue."""
        totals = self._totals[name]
        # Handler threads count starts while the loop counts outcomes.
        with self._lock:
            totals[key] = totals.get(key, 0) + amount

    def ended(self, key: _Key, counted: tuple[str, ...]) -> None:
        """A job's outcome: one more in each of the ``counted`` counters."""
        totals = self._totals
        with self._lock:
            for name in counted:
                named = totals[name]
                named[key] = named.get(key, 0) + 1

    def _observe(self, name: str, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._totals[name].items())
        return [Observation(value, self.attributes(key)) for key, value in items]


_job_metrics: weakref.WeakKeyDictionary[Any, _JobMetrics] = weakref.WeakKeyDictionary()
_job_metrics_lock = threading.Lock()


def _metrics_for(provider: MeterProvider) -> _JobMetrics:
    with _job_metrics_lock:
        found = _job_metrics.get(provider)
        if found is None:
            found = _job_metrics[provider] = _JobMetrics(provider.get_meter(_NAME, __version__))
        return found
