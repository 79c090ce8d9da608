"""Health: a worker's status, an HTTP endpoint for probes, and the database's health checks.

* :class:`WorkerStatus` is what a running worker says of itself
  (:attr:`Worker.status <sqla_graphile.worker.Worker.status>`): whether it runs, listens,
  heartbeats, reaches the database, is fenced, shutting down, or has a handler stuck.
* :class:`HealthServer` answers ``GET /livez`` and ``GET /readyz`` with ``200`` or
  ``503`` and a small JSON body, from an asyncio loop, with the standard library alone;
  :func:`serve_health` serves a worker's status while it runs (``graphile-worker run
  --health-port``).
* :func:`check_health` checks a database from outside any worker (``graphile-worker
  health``): reachable, its worker schema migrated and not newer than this library,
  and optionally that given workers (or enough of them) heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from ._urls import engine_from_url
from .errors import GraphileWorkerError
from .recovery import WorkerRecoveryConfig
from .schema import DEFAULT_SCHEMA, worker_schema
from .sql import statements
from .sql.catalog import qualified_name

# Defined with the worker, which builds it; published here, beside the endpoint.
from .worker.status import HEARTBEAT_FRESHNESS, WorkerStatus

if TYPE_CHECKING:
    from .worker import Worker

__all__ = [
    "DEFAULT_HEALTH_HOST",
    "HEARTBEAT_FRESHNESS",
    "HealthCheck",
    "HealthReport",
    "HealthServer",
    "Probe",
    "WorkerStatus",
    "bind_health_socket",
    "check_health",
    "serve_health",
    "worker_probe",
]

logger = logging.getLogger("sqla_graphile.health")

#: The address the endpoint listens on unless told otherwise: this host only. In a
#: container, where probes come from outside, listen on ``0.0.0.0``.
DEFAULT_HEALTH_HOST = "127.0.0.1"
#: Seconds a client gets to send its request line and headers.
_REQUEST_TIMEOUT = 5.0
_MAX_HEADERS = 100


# -- the HTTP endpoint ---------------------------------------------------------------------

#: A probe: given ``"live"`` or ``"ready"``, whether it passes and the JSON body to send.
Probe = Callable[[str], "tuple[bool, dict[str, Any]]"]

_PATHS = {"/livez": "live", "/readyz": "ready"}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def bind_health_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (``0``: any free port); raises ``OSError``.

    Binding before the worker starts makes a port in use an error at once, not a probe
    that fails later.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HealthServer:
    """Answers ``/livez`` and ``/readyz`` (``GET`` or ``HEAD``) from the loop it runs on.

    ``probe("live")`` and ``probe("ready")`` say whether each passes and give the JSON
    body: ``200`` when it passes, ``503`` when not; any other path is ``404``. Every
    answer closes its connection. ``sock`` is a listening socket
    (:func:`bind_health_socket`); :meth:`start` serves it on the running loop, and
    :meth:`close` stops (and closes it).
    """

    def __init__(self, probe: Probe, sock: socket.socket) -> None:
        self.probe = probe
        self.socket = sock
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The host and port listened on."""
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Serve on the running loop until :meth:`close`."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, sock=self.socket)

    async def close(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self.socket.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT)
            for _ in range(_MAX_HEADERS):  # the headers are read and ignored
                line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT)
                if line in (b"\r\n", b"\n", b""):
                    break
            method, status, body = self._answer(request)
            payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Service Unavailable')}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(head if method == "HEAD" else head + payload)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or never spoke: nothing to answer
        except Exception:
            logger.exception("the health endpoint failed to answer")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, request: bytes) -> tuple[str, int, dict[str, Any]]:
        parts = request.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "GET", 400, {"error": "bad request"}
        method, target = parts[0], parts[1].split("?", 1)[0]
        kind = _PATHS.get(target)
        if kind is None:
            return method, 404, {"error": "not found", "paths": sorted(_PATHS)}
        if method not in ("GET", "HEAD"):
            return method, 405, {"error": "method not allowed"}
        ok, body = self.probe(kind)
        return method, 200 if ok else 503, body


def worker_probe(worker: Worker) -> Probe:
    """The probe of one worker: per :attr:`WorkerStatus.live` and :attr:`WorkerStatus.ready`."""

    def probe(kind: str) -> tuple[bool, dict[str, Any]]:
        status = worker.status
        ok = status.live if kind == "live" else status.ready
        return ok, {"status": "ok" if ok else "unavailable", "worker": status.as_dict()}

    return probe


def serve_health(worker: Worker, port: int, host: str = DEFAULT_HEALTH_HOST) -> HealthServer:
    """Serve ``worker``'s ``/livez`` and ``/readyz`` on ``host``:``port`` while it runs.

    The socket is bound now (an ``OSError`` if the port is taken); the endpoint answers
    from the worker's own event loop, from its start (the ``worker_start`` hook) until
    every outcome is written at its stop (``worker_stop``), so an answer also proves
    that loop responsive. ``/livez`` fails when the worker is fenced or a handler thread
    is stuck past its time limit (:attr:`WorkerStatus.live`), ``/readyz`` per
    :attr:`WorkerStatus.ready` (and so from the moment a shutdown begins).
    """
    server = HealthServer(worker_probe(worker), bind_health_socket(host, port))
    bound = server.address[1]

    async def on_start(_event: Any) -> None:
        if server.socket.fileno() == -1:  # a later run of the worker: listen again
            server.socket = bind_health_socket(host, bound)
        await server.start()
        logger.info("health endpoint on http://%s:%d (/livez, /readyz)", *server.address)

    async def on_stop(_event: Any) -> None:
        await server.close()

    worker.hooks.on("worker_start")(on_start)
    worker.hooks.on("worker_stop")(on_stop)
    return server


# -- the database's health (graphile-worker health) -----------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """One check of :func:`check_health`: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """What :func:`check_health` found; healthy when every check passed."""

    checks: list[HealthCheck] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """Every check passed."""
        return all(check.ok for check in self.checks)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    lines = [line.strip() for line in str(orig or exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def check_health(
    bind: Engine | str | URL,
    schema: str = DEFAULT_SCHEMA,
    *,
    worker_ids: Sequence[str] = (),
    min_workers: int = 0,
    threshold: timedelta | None = None,
) -> HealthReport:
    """Check the database a worker would use, as ``graphile-worker health`` does.

    1. ``database``: reachable (a connection and a round trip);
    2. ``schema``: the worker schema is migrated (Graphile Worker's migration 20 or
       later) and holds no breaking migration newer than this library;
    3. ``worker <id>`` for each of ``worker_ids``: registered, its last heartbeat no older
       than ``threshold`` by the database's clock (default: the recovery default sweep
       threshold, 5 minutes, past which a sweep judges a worker dead);
    4. ``workers``, when ``min_workers`` is positive: at least that many registered
       workers with a fresh heartbeat.

    Failures are reported, never raised; the checks after a failed ``database`` check
    are not run. A URL is connected to with a 5-second connect timeout and disposed of.
    """
    from .migrations import HIGHEST_KNOWN_MIGRATION, check_database

    ws = worker_schema(schema)  # validates the name
    sql = statements(schema).catalog
    if min_workers < 0:
        raise ValueError("min_workers must be 0 or more")
    limit = threshold if threshold is not None else WorkerRecoveryConfig().sweep_threshold
    if limit <= timedelta(0):
        raise ValueError("threshold must be positive")
    engine = (
        bind
        if isinstance(bind, Engine)
        else engine_from_url(bind, connect_args={"connect_timeout": 5})
    )
    checks: list[HealthCheck] = []
    try:
        try:
            with engine.connect() as connection:
                server = connection.scalar(sql.server_version)
        except Exception as exc:
            checks.append(HealthCheck("database", False, f"unreachable: {_first_line(exc)}"))
            return HealthReport(checks)
        checks.append(HealthCheck("database", True, f"reachable (PostgreSQL {server})"))
        registry = False
        try:
            with engine.connect() as connection, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a newer, non-breaking migration is fine
                ledger = check_database(connection, schema)
                registry = (
                    ledger.schema_exists
                    and connection.scalar(
                        sql.relation, {"name": qualified_name(ws, ws.worker_registry.name)}
                    )
                    is not None
                )
        except GraphileWorkerError as exc:  # newer than this library, too old ...
            checks.append(HealthCheck("schema", False, " ".join(str(exc).split())))
            return HealthReport(checks)
        except Exception as exc:
            checks.append(HealthCheck("schema", False, f"cannot be read: {_first_line(exc)}"))
            return HealthReport(checks)
        if not ledger.table_exists or ledger.highest is None:
            checks.append(
                HealthCheck(
                    "schema",
                    False,
                    f"{schema!r} is not migrated: run `graphile-worker migrate` (or "
                    "`alembic upgrade heads`)",
                )
            )
            return HealthReport(checks)
        if ledger.highest < HIGHEST_KNOWN_MIGRATION:
            checks.append(
                HealthCheck(
                    "schema",
                    False,
                    f"{schema!r} is at migration {ledger.highest} of "
                    f"{HIGHEST_KNOWN_MIGRATION}: run `graphile-worker migrate`",
                )
            )
            return HealthReport(checks)
        newer = " (newer, not breaking)" if ledger.highest > HIGHEST_KNOWN_MIGRATION else ""
        recovery = "worker registry present" if registry else "no worker registry: recovery off"
        checks.append(
            HealthCheck(
                "schema", True, f"{schema!r} at migration {ledger.highest}{newer}; {recovery}"
            )
        )
        if worker_ids or min_workers:
            checks.extend(_worker_checks(engine, schema, registry, worker_ids, min_workers, limit))
    finally:
        if not isinstance(bind, Engine):
            engine.dispose()
    return HealthReport(checks)


def _worker_checks(
    engine: Engine,
    schema: str,
    registry: bool,
    worker_ids: Sequence[str],
    min_workers: int,
    threshold: timedelta,
) -> list[HealthCheck]:
    names = [f"worker {worker_id}" for worker_id in worker_ids]
    if min_workers:
        names.append("workers")
    if not registry:
        detail = "no worker registry in the schema: workers do not heartbeat there"
        return [HealthCheck(name, False, detail) for name in names]
    from .utils import WorkerUtils

    try:
        registered = WorkerUtils(engine, schema).list_active_workers(threshold)
    except Exception as exc:
        return [HealthCheck(name, False, f"cannot be read: {_first_line(exc)}") for name in names]
    by_id = {worker.worker_id: worker for worker in registered}
    limit = _age(threshold.total_seconds())
    checks: list[HealthCheck] = []
    for worker_id in worker_ids:
        found = by_id.get(worker_id)
        if found is None:
            checks.append(HealthCheck(f"worker {worker_id}", False, "not registered"))
            continue
        age = _age(found.heartbeat_age.total_seconds())
        if found.is_stale:
            detail = f"last heartbeat {age} ago, older than {limit}"
        else:
            detail = f"last heartbeat {age} ago"
        checks.append(HealthCheck(f"worker {worker_id}", not found.is_stale, detail))
    if min_workers:
        fresh = sum(1 for worker in registered if not worker.is_stale)
        checks.append(
            HealthCheck(
                "workers",
                fresh >= min_workers,
                f"{fresh} registered worker(s) heartbeat within {limit}; at least "
                f"{min_workers} wanted",
            )
        )
    return checks
