"""A loopback TCP proxy in front of the test PostgreSQL, to inject network faults.

``PgProxy`` listens on ``127.0.0.1`` (an ephemeral port) and forwards every connection
(a *flow*) to the PostgreSQL server, in threads of its own: it serves sync and async
tests alike, and subprocesses given :attr:`PgProxy.url`. Only loopback addresses are
ever listened on or connected to. The ``pg_proxy`` fixture (import ``pg_proxy_fixture``)
gives one per test and closes it after; ``with PgProxy(url) as proxy:`` makes more. The
controls are thread-safe:

``cut()``
    Every existing flow is closed abruptly (``SO_LINGER`` 0: an RST to both peers); new
    connections pass.
``freeze()`` / ``thaw()``
    Existing flows go silent: nothing is forwarded either way, no FIN or RST, the sockets
    stay open (a half-open link as the application sees it). New connections work.
    ``thaw()`` resumes the frozen flows (``thaw(number)``: that flow alone), delivering
    what was held back, as TCP would after a transient outage. ``release(number)``
    delivers only what a frozen flow held from the server, and the flow stays frozen.
``swallow_replies(match, then_cut=True)``
    The next flow whose client sends bytes containing ``match`` (any bytes if ``None``)
    loses the server's reply to them: everything up to and including the server's next
    ``ReadyForQuery`` is dropped. With ``then_cut`` the flow is then cut, so the client
    sees an error for a statement the server did run (and, in autocommit, committed).
    One-shot: it fires once per call (see :attr:`PgProxy.swallowed`).
``hold_replies(match)``
    The next flow whose client sends bytes containing ``match`` is frozen as those bytes
    pass: the server gets them and answers, the answer is held until ``thaw()``. The
    flow's number is appended to :attr:`PgProxy.held_flows`.
``partition()`` / ``heal()``
    Existing flows are frozen and new connections are accepted but held (nothing is
    forwarded, not even the startup) until ``heal()``, which thaws the flows and
    connects the held clients.

What it cannot simulate: the client's kernel talks to the proxy's kernel, which keeps
acknowledging and answering TCP keepalives, so ``TCP_USER_TIMEOUT`` and keepalive
probes never fire on a frozen flow; only application-level time limits notice it.
Swallowing frames the server's messages and assumes no pipelining (the reply that
follows the matching bytes is theirs); a TLS or GSS-encrypted flow is never matched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import pytest
from sqlalchemy.engine import make_url

__all__ = ["PgProxy", "pg_proxy_fixture"]

_CHUNK = 65536
_TICK = 0.05  # how often blocked pumps look at their flow's state
_UP, _DOWN = 0, 1  # client -> server, server -> client
_Action = Literal["swallow", "swallow_cut", "hold"]


def _require_loopback(host: str) -> str:
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"the proxy only talks to loopback addresses, not {host} ({address})")
    return address


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with an RST where possible."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _ServerFraming:
    """Finds message boundaries in a server -> client PostgreSQL stream.

    The stream may open with one-byte answers to SSL/GSS encryption requests: ``N`` is
    skipped, ``S``/``G`` make the flow opaque (encrypted, never parsed again).
    """

    def __init__(self) -> None:
        self.opening = True
        self.opaque = False
        self._header = bytearray()
        self._remaining = 0
        self._type = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The ``(end offset in data, message type)`` of each message ``data`` completes."""
        ends: list[tuple[int, bytes]] = []
        i = 0
        while i < len(data) and not self.opaque:
            if self.opening and not self._header and self._remaining == 0:
                first = data[i : i + 1]
                if first == b"N":
                    i += 1
                    continue
                self.opening = False
                if first in (b"S", b"G"):
                    self.opaque = True
                    break
            if self._remaining == 0:
                take = min(5 - len(self._header), len(data) - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) < 5:
                    break
                self._type = bytes(self._header[:1])
                self._remaining = struct.unpack("!i", self._header[1:5])[0] - 4
                self._header.clear()
                if self._remaining == 0:
                    ends.append((i, self._type))
                continue
            take = min(self._remaining, len(data) - i)
            self._remaining -= take
            i += take
            if self._remaining == 0:
                ends.append((i, self._type))
        return ends


@dataclass(eq=False)
class _Flow:
    """One proxied connection: the client's socket, the server's, and their state."""

    number: int
    client: socket.socket
    server: socket.socket
    lock: threading.Condition = field(
        default_factory=lambda: threading.Condition(threading.RLock())
    )
    frozen: bool = False
    closed: bool = False
    held: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    eof_held: list[bool] = field(default_factory=lambda: [False, False])
    eof_sent: list[bool] = field(default_factory=lambda: [False, False])
    framing: _ServerFraming = field(default_factory=_ServerFraming)
    tail: bytes = b""
    swallowing: bool = False
    cut_after_swallow: bool = True

    def sockets(self, direction: int) -> tuple[socket.socket, socket.socket]:
        return (self.client, self.server) if direction == _UP else (self.server, self.client)


class PgProxy:
    """A fault-injecting TCP proxy to a loopback PostgreSQL (see the module docstring)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        url = make_url(database_url)
        self.upstream = (_require_loopback(url.host or "127.0.0.1"), url.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.url: str = (
            url.difference_update_query(["host", "port", "hostaddr"])
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )
        """The test database's URL, through the proxy."""
        self._lock = threading.Lock()
        self._flows: list[_Flow] = []
        self._held_clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._partitioned = False
        self._armed: list[tuple[bytes | None, _Action]] = []
        self._stopping = threading.Event()
        self.flows_opened = 0
        """Flows connected to the server so far."""
        self.bytes_up = 0
        """Bytes forwarded client -> server."""
        self.bytes_down = 0
        """Bytes forwarded server -> client (swallowed bytes excluded)."""
        self.swallowed = 0
        """Replies swallowed so far."""
        self.held_flows: list[int] = []
        """Numbers of the flows frozen by :meth:`hold_replies`, in order."""
        self._accepter = self._spawn(self._accept_loop, "pg-proxy-accept")

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, abort every flow and held client, and join the threads."""
        self._stopping.set()
        self._accepter.join(5)
        self._listener.close()
        with self._lock:
            held, self._held_clients = self._held_clients, []
        for client in held:
            _abort(client)
        self.cut()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> PgProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- controls -----------------------------------------------------------------------

    @property
    def active_flows(self) -> int:
        """Flows still open."""
        with self._lock:
            return sum(1 for flow in self._flows if not flow.closed)

    def cut(self) -> int:
        """Abort every existing flow (RST to both peers); return how many were open."""
        count = 0
        for flow in self._snapshot():
            with flow.lock:
                if not flow.closed:
                    count += 1
                    self._kill(flow)
        return count

    def freeze(self) -> int:
        """Silence every existing flow (nothing forwarded, nothing closed); return how many."""
        count = 0
        for flow in self._snapshot():
            with flow.lock:
                if not flow.closed:
                    flow.frozen = True
                    count += 1
        return count

    def thaw(self, number: int | None = None) -> None:
        """Resume the frozen flows (only flow ``number`` if given), delivering what they held."""
        for flow in self._snapshot():
            if number is not None and flow.number != number:
                continue
            with flow.lock:
                if flow.frozen and not flow.closed:
                    flow.frozen = False
                    for direction in (_UP, _DOWN):
                        data, flow.held[direction] = bytes(flow.held[direction]), bytearray()
                        eof, flow.eof_held[direction] = flow.eof_held[direction], False
                        if data:
                            self._deliver(flow, direction, data)
                        if eof and not flow.closed:
                            self._deliver(flow, direction, b"")
                    flow.lock.notify_all()

    def release(self, number: int) -> None:
        """Deliver what frozen flow ``number`` held from the server; it stays frozen.

        The client gets the answer it waited for, and nothing it sends next gets through.
        """
        for flow in self._snapshot():
            if flow.number != number:
                continue
            with flow.lock:
                if flow.frozen and not flow.closed:
                    data, flow.held[_DOWN] = bytes(flow.held[_DOWN]), bytearray()
                    if data:
                        self._deliver(flow, _DOWN, data)

    def partition(self) -> None:
        """Freeze every flow and hold every new connection until :meth:`heal`."""
        with self._lock:
            self._partitioned = True
        self.freeze()

    def heal(self) -> None:
        """End a partition: thaw the flows and connect the clients held meanwhile."""
        with self._lock:
            self._partitioned = False
            held, self._held_clients = self._held_clients, []
        self.thaw()
        for client in held:
            self._open_flow(client)

    def swallow_replies(self, match: bytes | None = None, then_cut: bool = True) -> None:
        """Drop the server's next reply on the next flow whose client sends ``match``.

        Calls queue up: each fires once, on the first matching bytes after it.
        """
        with self._lock:
            self._armed.append((match, "swallow_cut" if then_cut else "swallow"))

    def hold_replies(self, match: bytes) -> None:
        """Freeze the next flow whose client sends ``match``, once those bytes are sent.

        The server runs the statement; its reply waits for :meth:`thaw`. One-shot, queued
        with :meth:`swallow_replies` calls.
        """
        with self._lock:
            self._armed.append((match, "hold"))

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _snapshot(self) -> list[_Flow]:
        with self._lock:
            return list(self._flows)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            readable, _, _ = select.select([self._listener], [], [], _TICK)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            client.setblocking(True)
            with self._lock:
                if self._partitioned:
                    self._held_clients.append(client)
                    continue
            self._open_flow(client)

    def _open_flow(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _abort(client)
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.flows_opened += 1
            flow = _Flow(self.flows_opened, client, server, frozen=self._partitioned)
            self._flows = [f for f in self._flows if not f.closed]
            self._flows.append(flow)
        self._spawn(self._pump, f"pg-proxy-{flow.number}-up", flow, _UP)
        self._spawn(self._pump, f"pg-proxy-{flow.number}-down", flow, _DOWN)

    def _pump(self, flow: _Flow, direction: int) -> None:
        source, _ = flow.sockets(direction)
        while True:
            with flow.lock:
                while flow.frozen and not flow.closed and not self._stopping.is_set():
                    flow.lock.wait(_TICK)
                if flow.closed or flow.eof_sent[direction] or flow.eof_held[direction]:
                    return
            try:
                readable, _, _ = select.select([source], [], [], _TICK)
                data = source.recv(_CHUNK) if readable else None
            except (OSError, ValueError):
                with flow.lock:
                    self._kill(flow)
                return
            if data is None:
                continue
            with flow.lock:
                if flow.closed:
                    return
                if flow.frozen:
                    if data:
                        flow.held[direction] += data
                    else:
                        flow.eof_held[direction] = True
                    continue
                self._deliver(flow, direction, data)

    def _deliver(self, flow: _Flow, direction: int, data: bytes) -> None:
        """Forward ``data`` (``b""``: the end of the stream); the flow's lock is held."""
        _, target = flow.sockets(direction)
        if direction == _UP and data:
            self._check_armed(flow, data)
        if direction == _DOWN and data:
            ends = flow.framing.feed(data)
            if flow.swallowing:
                end = next((end for end, kind in ends if kind == b"Z"), None)
                if end is None:
                    return
                flow.swallowing = False
                with self._lock:
                    self.swallowed += 1
                if flow.cut_after_swallow:
                    self._kill(flow)
                    return
                data = data[end:]
                if not data:
                    return
        try:
            if data:
                target.sendall(data)
                with self._lock:
                    if direction == _UP:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
            else:
                flow.eof_sent[direction] = True
                target.shutdown(socket.SHUT_WR)
                if all(flow.eof_sent):
                    self._kill(flow)
        except OSError:
            self._kill(flow)

    def _check_armed(self, flow: _Flow, data: bytes) -> None:
        window = flow.tail + data
        with self._lock:
            if not flow.swallowing and not flow.framing.opaque:
                for index, (match, action) in enumerate(self._armed):
                    if match is None or match in window:
                        del self._armed[index]
                        if action == "hold":
                            # Set before the bytes go: they pass, what follows waits.
                            flow.frozen = True
                            self.held_flows.append(flow.number)
                        else:
                            flow.swallowing = True
                            flow.cut_after_swallow = action == "swallow_cut"
                        break
            longest = max((len(m or b"") for m, _ in self._armed), default=1)
        flow.tail = window[-(longest - 1) :] if longest > 1 else b""

    def _kill(self, flow: _Flow) -> None:
        """Abort both sockets of ``flow``; its lock is held."""
        if flow.closed:
            return
        flow.closed = True
        _abort(flow.client)
        _abort(flow.server)
        flow.lock.notify_all()


@pytest.fixture(name="pg_proxy")
def pg_proxy_fixture(database_url: str) -> Iterator[PgProxy]:
    """A :class:`PgProxy` to the test database's server, stopped after the test."""
    proxy = PgProxy(database_url)
    try:
        yield proxy
    finally:
        proxy.close()
