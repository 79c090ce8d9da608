"""The queue gauges of :mod:`sqla_graphile.otel`: one grouped query at an interval.

Imported through :mod:`sqla_graphile.otel` (the ``otel`` extra).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, TypeAlias

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from ._queue_metrics import QueueSample, read_queue_samples
from ._urls import engine_from_url, normalize_url
from ._version import __version__
from .errors import InvalidArgument, InvalidArgumentType
from .schema import DEFAULT_SCHEMA, validate_schema_name

__all__ = ["MIN_QUEUE_INTERVAL", "QueueObserver", "observe_queues"]

#: The shortest interval between two queries of :func:`observe_queues` (seconds).
MIN_QUEUE_INTERVAL = 1.0

_NAME = "sqla_graphile"
logger = logging.getLogger("sqla_graphile.otel")
_Attributes: TypeAlias = dict[str, Any]


class QueueObserver:
    """Gauges of the jobs table, from one query per ``interval`` (see :func:`observe_queues`).

    The gauges (attributes ``task`` and ``queue``):

    ``graphile_worker.queue.jobs``
        jobs by ``state``: ``runnable`` (due now), ``scheduled`` (due later),
        ``locked`` and ``permanently_failed``;
    ``graphile_worker.queue.oldest_runnable_age``
        seconds the oldest runnable job has been due (``0``: none is waiting);
    ``graphile_worker.queue.oldest_lock_age``
        seconds the oldest job lock has been held (``0``: no lock).

    A task and queue seen once keeps reporting (zeros once empty) for the observer's
    life, so alerts on "no runnable jobs" see a zero rather than a missing series.
    """

    def __init__(
        self,
        engine: Engine,
        schema: str,
        *,
        interval: float,
        timeout: float,
        by_queue: bool,
        owns_engine: bool,
    ) -> None:
        self.engine = engine
        self.schema = schema
        self.interval = interval
        self.timeout = timeout
        self.by_queue = by_queue
        self._owns_engine = owns_engine
        self._lock = threading.Lock()
        self._sampled_at: float | None = None
        self._samples: list[QueueSample] = []
        self._seen: set[tuple[str, str | None]] = set()
        self._closed = False
        self.queries = 0
        """Queries run so far."""

    def sample(self) -> list[QueueSample]:
        """Read the jobs table now; the gauges report this sample until it is stale.

        Per task and queue (queues merged per task with ``by_queue=False``), including
        zeros for groups seen before. Raises what the query raised.
        """
        with self._lock:
            with self.engine.begin() as connection:
                rows = read_queue_samples(connection, self.schema, self.timeout)
            self.queries += 1
            self._sampled_at = time.monotonic()
            self._samples = self._grouped(rows)
            return list(self._samples)

    def _grouped(self, rows: list[QueueSample]) -> list[QueueSample]:
        groups: dict[tuple[str, str | None], list[QueueSample]] = {}
        for row in rows:
            key = (row.task_identifier, row.queue_name if self.by_queue else None)
            groups.setdefault(key, []).append(row)
        self._seen.update(groups)
        result = []
        for key in sorted(self._seen, key=lambda k: (k[0], k[1] or "")):
            members = groups.get(key, [])
            result.append(
                QueueSample(
                    key[0],
                    key[1],
                    sum(m.runnable for m in members),
                    sum(m.scheduled for m in members),
                    sum(m.locked for m in members),
                    sum(m.permanently_failed for m in members),
                    _oldest(m.oldest_runnable_age for m in members),
                    _oldest(m.oldest_lock_age for m in members),
                )
            )
        return result

    def _current(self) -> list[QueueSample]:
        """The sample for a gauge: the last one unless it is older than the interval."""
        if self._closed:
            return []
        sampled_at = self._sampled_at
        if sampled_at is not None and time.monotonic() - sampled_at < self.interval:
            return self._samples
        try:
            return self.sample()
        except Exception as exc:
            logger.warning("reading the queue gauges failed: %s", str(exc).strip().split("\n")[0])
            # The other gauges of this collection do not try again.
            self._sampled_at, self._samples = time.monotonic(), []
            return []

    def _attributes(self, sample: QueueSample) -> _Attributes:
        attributes: _Attributes = {"task": sample.task_identifier}
        if self.by_queue:
            attributes["queue"] = sample.queue_name or ""
        return attributes

    def _observe_jobs(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for sample in self._current():
            attributes = self._attributes(sample)
            for state, value in (
                ("runnable", sample.runnable),
                ("scheduled", sample.scheduled),
                ("locked", sample.locked),
                ("permanently_failed", sample.permanently_failed),
            ):
                observations.append(Observation(value, {**attributes, "state": state}))
        return observations

    def _observe_runnable_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.oldest_runnable_age or 0.0, self._attributes(sample))
            for sample in self._current()
        ]

    def _observe_lock_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.oldest_lock_age or 0.0, self._attributes(sample))
            for sample in self._current()
        ]

    def close(self) -> None:
        """Stop querying (the gauges then report nothing); dispose of an engine it made."""
        self._closed = True
        if self._owns_engine:
            self.engine.dispose()


class _QueueGauges:
    """The queue gauges of one meter provider; they report what its observer reads.

    Instruments cannot be removed, so a provider keeps its gauges, and an observer made
    after an earlier one was closed takes its place behind them.
    """

    def __init__(self, meter: Meter) -> None:
        self.observer: QueueObserver | None = None
        meter.create_observable_gauge(
            "graphile_worker.queue.jobs",
            callbacks=[self._jobs],
            unit="{job}",
            description="Jobs by state (runnable, scheduled, locked, permanently_failed)",
        )
        meter.create_observable_gauge(
            "graphile_worker.queue.oldest_runnable_age",
            callbacks=[self._runnable_age],
            unit="s",
            description="Seconds the oldest runnable job has been due",
        )
        meter.create_observable_gauge(
            "graphile_worker.queue.oldest_lock_age",
            callbacks=[self._lock_age],
            unit="s",
            description="Seconds the oldest job lock has been held",
        )

    def _jobs(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_jobs(options) if observer is not None else []

    def _runnable_age(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_runnable_age(options) if observer is not None else []

    def _lock_age(self, options: CallbackOptions) -> Iterable[Observation]:
        observer = self.observer
        return observer._observe_lock_age(options) if observer is not None else []


_queue_gauges: weakref.WeakKeyDictionary[Any, _QueueGauges] = weakref.WeakKeyDictionary()
_queue_gauges_lock = threading.Lock()


def _oldest(ages: Iterable[float | None]) -> float | None:
    known = [age for age in ages if age is not None]
    return max(known) if known else None


def observe_queues(
    bind: Engine | str | URL | Any,
    *,
    schema: str | None = None,
    meter_provider: MeterProvider | None = None,
    interval: float = 15.0,
    timeout: float = 5.0,
    by_queue: bool = True,
) -> QueueObserver:
    """Register gauges of runnable, scheduled, locked and failed jobs and their ages.

    ``bind`` is a sync ``Engine``, a database URL, or a ``Worker`` (its engine and
    schema). The gauges are read at each metrics collection from one aggregate query
    (a sequential scan of the jobs table), run at most once per ``interval`` seconds
    whatever the number of readers, and bounded by ``timeout`` seconds; a failed query
    is logged and the gauges report nothing that time. Observe queues once per
    database, not in every worker process: every process would report the same numbers.
    ``by_queue=False`` merges the named queues of each task.
    """
    if interval < MIN_QUEUE_INTERVAL:
        raise InvalidArgument(f"interval must be at least {MIN_QUEUE_INTERVAL:g} s")
    if timeout <= 0:
        raise InvalidArgument("timeout must be positive")
    owns = False
    if isinstance(bind, Engine):
        engine = bind
    elif isinstance(bind, (str, URL)):
        engine, owns = engine_from_url(normalize_url(bind)), True
    else:
        create_utils = getattr(bind, "create_utils", None)
        if create_utils is None:
            raise InvalidArgumentType(
                f"observe_queues takes an Engine, a database URL or a Worker, "
                f"not {type(bind).__name__}"
            )
        engine = create_utils().bind
        schema = bind.schema if schema is None else schema
    schema = validate_schema_name(schema if schema is not None else DEFAULT_SCHEMA)
    provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    with _queue_gauges_lock:
        gauges = _queue_gauges.get(provider)
        if gauges is None:
            gauges = _queue_gauges[provider] = _QueueGauges(provider.get_meter(_NAME, __version__))
        if gauges.observer is not None and not gauges.observer._closed:
            raise InvalidArgument("queues are already observed on this meter provider")
        observer = QueueObserver(
            engine, schema, interval=interval, timeout=timeout, by_queue=by_queue, owns_engine=owns
        )
        gauges.observer = observer
    return observer
