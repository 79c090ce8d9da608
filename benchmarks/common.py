"""What the two benchmarks share: their options, the schemas they make, the environment line."""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url

from sqla_graphile import __version__, migrate
from sqla_graphile.schema import quote_schema


def parser(description: str, *, quick: str, repeats: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; ``quick`` and ``repeats`` are their help texts."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (default: $DATABASE_URL); schemas bench_* are made and dropped",
    )
    result.add_argument("--quick", action="store_true", help=quick)
    result.add_argument("--repeats", type=int, help=repeats)
    result.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    result.add_argument("--node", default=shutil.which("node"), help="the node executable")
    return result


def database_url(args: argparse.Namespace, parser: argparse.ArgumentParser) -> URL:
    """The plain libpq URL given, or a usage error."""
    if not args.database_url:
        parser.error("give --database-url or set DATABASE_URL")
    return make_url(args.database_url).set(drivername="postgresql")


def node_version(node: str) -> str:
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def versions(engine: Engine, node: str | None) -> dict[str, Any]:
    """Versions of everything measured, for the first line and the JSON file."""
    with engine.connect() as connection:
        server = connection.scalar(text("show server_version"))
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "sqla_graphile": __version__,
        "node": node_version(node) if node else None,
        "postgresql": server,
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


@dataclass
class Schemas:
    """The worker schemas a benchmark makes (``bench_<token>_<name>``), dropped at the end."""

    url: URL
    engine: Engine
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    schemas: list[str] = field(default_factory=list)

    @property
    def conninfo(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def fresh_schema(self, name: str) -> str:
        schema = f"bench_{self.token}_{name}"
        self.schemas.append(schema)
        migrate(self.engine, schema=schema)
        return schema

    def drop_schemas(self) -> None:
        with self.engine.begin() as connection:
            for schema in self.schemas:
                connection.execute(text(f"drop schema if exists {quote_schema(schema)} cascade"))
        self.schemas.clear()


# -- CPU time: ours, Node's, and the PostgreSQL backends serving each ------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid``; ``None`` if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def named(url: URL, application_name: str) -> URL:
    """``url`` with an ``application_name``: how the server's backends are told apart."""
    return url.update_query_dict({"application_name": application_name})


class ServerCpu:
    """CPU seconds of the PostgreSQL backends of connections named ``application_name``.

    A thread polls ``pg_stat_activity`` for their process ids and reads each one's CPU
    time from ``/proc`` (the server must run on this machine), from the start of the
    ``with`` block to its end: backends already open count from the start, those opened
    inside from their birth. A backend that exits inside the block loses at most one
    polling interval. ``seconds`` is ``None`` where ``/proc`` shows no backend (another
    machine, or no permission). The poller's own CPU is subtracted from ``own`` (this
    process's CPU over the block), so that it does not count as the client's.
    """

    def __init__(self, conninfo: str, application_name: str, interval: float = 0.02) -> None:
        self.conninfo = conninfo
        self.name = application_name
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.seconds: float | None = None
        self.own = 0.0
        self._stop = threading.Event()
        self._poller_cpu = 0.0
        self._thread: threading.Thread | None = None
        self._connection: psycopg.Connection[Any] | None = None

    def _sample(self, initial: bool = False) -> None:
        assert self._connection is not None
        rows = self._connection.execute(
            "select pid from pg_stat_activity where application_name = %s", (self.name,)
        ).fetchall()
        for (pid,) in rows:
            cpu = process_cpu(pid)
            if cpu is None:
                continue
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = cpu

    def _poll(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample()
        self._poller_cpu = time.thread_time() - started

    def __enter__(self) -> ServerCpu:
        self._connection = psycopg.connect(self.conninfo, autocommit=True)
        self._sample(initial=True)
        self._own_start = time.process_time()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._thread is not None and self._connection is not None
        self._stop.set()
        self._thread.join()
        self.own = time.process_time() - self._own_start - self._poller_cpu
        self._sample()
        self._connection.close()
        if self.last:
            self.seconds = sum(self.last[pid] - self.first[pid] for pid in self.last)
