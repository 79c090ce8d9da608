"""A Prometheus scrape endpoint for the worker's metrics (install the ``prometheus`` extra).

For deployments without an OpenTelemetry collector::

    from sqla_graphile.otel import instrument, observe_queues
    from sqla_graphile.prometheus import serve_prometheus

    endpoint = serve_prometheus(9464, host="0.0.0.0")     # GET /metrics
    instrument(worker, meter_provider=endpoint.meter_provider, tracing=False)
    observe_queues(worker, meter_provider=endpoint.meter_provider)

The endpoint is OpenTelemetry's Prometheus exporter on ``prometheus_client``'s default
registry, served by ``prometheus_client``'s HTTP server in a daemon thread; the registry's
process and Python collectors (CPU, memory, open files, garbage collection) come along.
OpenTelemetry names become Prometheus ones: dots turn into underscores, counters get
``_total`` and units a suffix (``graphile_worker_jobs_completed_total``,
``graphile_worker_job_duration_seconds_bucket``, ``graphile_worker_queue_jobs``).
"""

from __future__ import annotations

import threading
from typing import Any

try:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import start_http_server
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "sqla_graphile.prometheus needs the Prometheus exporter: "
        "pip install 'sqla-graphile[prometheus]'"
    ) from exc

from .errors import InvalidArgument

__all__ = [
    "DEFAULT_PROMETHEUS_HOST",
    "DEFAULT_PROMETHEUS_PORT",
    "PrometheusEndpoint",
    "serve_prometheus",
]

#: The interface the endpoint listens on unless told otherwise (this machine only).
DEFAULT_PROMETHEUS_HOST = "127.0.0.1"
#: The port registered for OpenTelemetry's Prometheus exporter.
DEFAULT_PROMETHEUS_PORT = 9464


class PrometheusEndpoint:
    """A running scrape endpoint and the meter provider whose metrics it serves."""

    def __init__(
        self, meter_provider: MeterProvider, server: Any, thread: threading.Thread
    ) -> None:
        self.meter_provider = meter_provider
        """Give it to :func:`~sqla_graphile.otel.instrument` and
        :func:`~sqla_graphile.otel.observe_queues`."""
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]
        """The port listened on (the one chosen by the system when ``0`` was asked)."""

    @property
    def url(self) -> str:
        """The metrics URL, ``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and shut the meter provider down (its metrics leave the registry)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.meter_provider.shutdown()


def serve_prometheus(
    port: int = DEFAULT_PROMETHEUS_PORT,
    host: str = DEFAULT_PROMETHEUS_HOST,
    *,
    service_name: str = "sqla-graphile",
) -> PrometheusEndpoint:
    """Serve metrics for Prometheus at ``http://host:port/metrics``; returns the endpoint.

    The socket is bound now (an ``OSError`` if the port is taken; ``0`` picks a free
    port). The endpoint's ``meter_provider`` is a new OpenTelemetry SDK provider whose
    only reader is the Prometheus exporter; ``service_name`` is its resource's
    ``service.name`` (shown in ``target_info``).
    """
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port must be between 0 and 65535, not {port}")
    reader = PrometheusMetricReader()
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": service_name})
    )
    try:
        server, thread = start_http_server(port, addr=host)
    except BaseException:
        provider.shutdown()
        raise
    return PrometheusEndpoint(provider, server, thread)
