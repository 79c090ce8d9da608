"""The fault-injecting proxy does what each control promises, against the real PostgreSQL.

Blocking calls that a fault should stall run in a helper thread; the test waits for them
a short, bounded time (silence is the expected outcome) or a generous one (an answer is).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg
import pytest
from netproxy import PgProxy, _ServerFraming
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from worker_fixtures import TIMEOUT, execute, wait_for

#: How long a stalled call is given to (wrongly) answer: silence is the expected outcome.
SILENCE = 0.5

_T = TypeVar("_T")


@dataclass
class Call(Generic[_T]):
    """A blocking call running in a thread: its result or error once ``done`` is set."""

    done: threading.Event = field(default_factory=threading.Event)
    result: _T | None = None
    error: BaseException | None = None

    def wait(self, timeout: float = TIMEOUT) -> _T | None:
        assert self.done.wait(timeout), "the call did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def in_thread(fn: Callable[[], _T]) -> Call[_T]:
    call: Call[_T] = Call()

    def run() -> None:
        try:
            call.result = fn()
        except BaseException as exc:
            call.error = exc
        finally:
            call.done.set()

    threading.Thread(target=run, daemon=True).start()
    return call


def libpq(url: str) -> str:
    """``url`` as libpq (psycopg.connect) takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def connect(pg_proxy: PgProxy) -> Iterator[Callable[[], psycopg.Connection[Any]]]:
    """Open autocommit psycopg connections through the proxy; all closed after the test."""
    opened: list[psycopg.Connection[Any]] = []

    def open_one() -> psycopg.Connection[Any]:
        connection = psycopg.connect(libpq(pg_proxy.url), autocommit=True, connect_timeout=10)
        opened.append(connection)
        return connection

    yield open_one
    pg_proxy.cut()
    for connection in opened:
        connection.close()


def select_one(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute("select 1").fetchone()
    assert row is not None
    value: int = row[0]
    return value


def backend_alive(engine: Engine, pid: int) -> bool:
    found = execute(engine, "select count(*) as n from pg_stat_activity where pid = :p", p=pid)
    return bool(found[0]["n"])


def test_forwards_to_the_test_database_on_loopback(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]], database_url: str
) -> None:
    """Connections through ``url`` reach the test database; the proxy counts its flows."""
    url = make_url(pg_proxy.url)
    assert (url.host, url.port, url.database) == (
        "127.0.0.1",
        pg_proxy.port,
        make_url(database_url).database,
    )
    connection = connect()
    assert select_one(connection) == 1
    row = connection.execute("select current_database()").fetchone()
    assert row is not None and row[0] == url.database
    assert pg_proxy.flows_opened == 1 and pg_proxy.active_flows == 1
    assert pg_proxy.bytes_up > 0 and pg_proxy.bytes_down > 0


def test_refuses_a_server_off_loopback() -> None:
    """The proxy never talks to a non-loopback address."""
    with pytest.raises(ValueError, match="loopback"):
        PgProxy("postgresql://postgres@192.0.2.1:5432/postgres")


def test_serves_a_subprocess(pg_proxy: PgProxy) -> None:
    """Another process can use the proxy: it runs in threads, not on a test's loop."""
    code = (
        "import sys, psycopg\n"
        "with psycopg.connect(sys.argv[1], connect_timeout=10) as c:\n"
        "    print(c.execute('select 41 + 1').fetchone()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, libpq(pg_proxy.url)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert done.stdout.strip() == "42"
    assert pg_proxy.flows_opened == 1


def test_cut_aborts_existing_flows_and_lets_new_ones_pass(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    """After ``cut()`` an open connection fails at once; a new one works."""
    old = connect()
    assert select_one(old) == 1
    assert pg_proxy.cut() == 1
    with pytest.raises(psycopg.OperationalError):
        select_one(old)
    assert select_one(connect()) == 1
    assert pg_proxy.flows_opened == 2


def test_freeze_silences_existing_flows_only_and_thaw_resumes_them(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]], engine: Engine
) -> None:
    """A frozen flow answers nothing and is not closed; new flows work; thaw delivers."""
    old = connect()
    pid = old.info.backend_pid
    assert pg_proxy.freeze() == 1
    stalled = in_thread(lambda: select_one(old))
    assert not stalled.done.wait(SILENCE), "a frozen flow answered"
    # Neither end saw a FIN or an RST: the server's backend and the client's socket live.
    assert backend_alive(engine, pid)
    assert not old.closed and not old.broken
    fresh = connect()
    assert select_one(fresh) == 1
    assert not stalled.done.is_set()

    pg_proxy.thaw()
    assert stalled.wait() == 1
    assert select_one(old) == 1


def test_swallowed_reply_of_a_committed_update_then_cut(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]], engine: Engine
) -> None:
    """The client of a swallowed UPDATE gets an error, yet the UPDATE was committed."""
    execute(engine, "drop table if exists netproxy_swallow")
    execute(engine, "create table netproxy_swallow (id int primary key, v int)")
    try:
        execute(engine, "insert into netproxy_swallow values (1, 1)")
        connection = connect()
        assert select_one(connection) == 1
        pg_proxy.swallow_replies(b"netproxy_swallow")
        with pytest.raises(psycopg.OperationalError):
            connection.execute("update netproxy_swallow set v = 2 where id = 1")
        assert pg_proxy.swallowed == 1
        assert execute(engine, "select v from netproxy_swallow")[0]["v"] == 2
        # One-shot: the next statement on a new flow gets its reply.
        again = connect()
        again.execute("update netproxy_swallow set v = 3 where id = 1")
        assert execute(engine, "select v from netproxy_swallow")[0]["v"] == 3
        assert pg_proxy.swallowed == 1
    finally:
        execute(engine, "drop table if exists netproxy_swallow")


def test_swallow_only_matches_its_bytes_and_without_cut_leaves_the_client_waiting(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    """Other statements pass; the matching one's reply never arrives; the flow stays open."""
    connection = connect()
    pg_proxy.swallow_replies(b"select 'lost'", then_cut=False)
    assert select_one(connection) == 1
    waiting = in_thread(lambda: connection.execute("select 'lost'").fetchone())
    assert not waiting.done.wait(SILENCE), "the swallowed reply arrived"
    wait_for(lambda: pg_proxy.swallowed == 1, what="the reply swallowed")
    assert pg_proxy.active_flows == 1
    pg_proxy.cut()
    with pytest.raises(psycopg.OperationalError):
        waiting.wait()


def test_held_reply_waits_for_release_after_the_server_ran_it(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]], engine: Engine
) -> None:
    """``hold_replies``: the matching statement runs; its reply and its flow wait.

    ``release`` delivers the reply and keeps the flow frozen; thawing that flow alone
    resumes it while other frozen flows stay silent.
    """
    execute(engine, "drop table if exists netproxy_hold")
    execute(engine, "create table netproxy_hold (id int primary key, v int)")
    try:
        execute(engine, "insert into netproxy_hold values (1, 1)")
        other, held = connect(), connect()
        pg_proxy.hold_replies(b"netproxy_hold")
        waiting = in_thread(
            lambda: held.execute(
                "update netproxy_hold set v = 2 where id = 1 returning v"
            ).fetchone()
        )
        wait_for(lambda: pg_proxy.held_flows, what="the flow held")
        assert not waiting.done.wait(SILENCE), "the held reply arrived"
        wait_for(
            lambda: execute(engine, "select v from netproxy_hold")[0]["v"] == 2,
            what="the update committed on the server",
        )
        assert select_one(other) == 1  # another flow is not held
        pg_proxy.freeze()
        stalled = in_thread(lambda: select_one(other))
        (number,) = pg_proxy.held_flows
        pg_proxy.release(number)
        assert waiting.wait() == (2,)
        after = in_thread(lambda: select_one(held))
        assert not after.done.wait(SILENCE), "a released flow let the next statement pass"
        pg_proxy.thaw(number)
        assert after.wait() == 1
        assert not stalled.done.wait(SILENCE), "thawing one flow thawed another"
        pg_proxy.thaw()
        assert stalled.wait() == 1
    finally:
        execute(engine, "drop table if exists netproxy_hold")


def test_partition_holds_old_and_new_connections_until_heal(
    pg_proxy: PgProxy, connect: Callable[[], psycopg.Connection[Any]], engine: Engine
) -> None:
    """During a partition nothing gets through, not even a new connection; heal resumes."""
    old = connect()
    pg_proxy.partition()
    stalled = in_thread(lambda: select_one(old))
    connecting = in_thread(lambda: select_one(connect()))
    assert not stalled.done.wait(SILENCE), "a partitioned flow answered"
    assert not connecting.done.wait(SILENCE), "a connection got through the partition"
    assert execute(engine, "select 1 as one")[0]["one"] == 1  # the server itself is fine
    opened = pg_proxy.flows_opened

    pg_proxy.heal()
    assert stalled.wait() == 1
    assert connecting.wait() == 1
    assert pg_proxy.flows_opened == opened + 1


def test_close_stops_everything(database_url: str) -> None:
    """Closing the proxy aborts its flows and frees its port."""
    with PgProxy(database_url) as proxy:
        connection = psycopg.connect(libpq(proxy.url), autocommit=True, connect_timeout=10)
        assert select_one(connection) == 1
    with pytest.raises(psycopg.OperationalError):
        select_one(connection)
    connection.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq(proxy.url), connect_timeout=2)


def test_server_framing_survives_any_split() -> None:
    """Message ends are found however the server's bytes are chunked."""
    auth_ok = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    ready = b"Z\x00\x00\x00\x05I"
    stream = b"N" + auth_ok + ready
    for size in (1, 2, 3, 7, len(stream)):
        framing = _ServerFraming()
        kinds: list[bytes] = []
        for start in range(0, len(stream), size):
            kinds += [kind for _, kind in framing.feed(stream[start : start + size])]
        assert kinds == [b"R", b"Z"]
        assert not framing.opaque
    encrypted = _ServerFraming()
    assert encrypted.feed(b"S\x16\x03\x01") == [] and encrypted.opaque
