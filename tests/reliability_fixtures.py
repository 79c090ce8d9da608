"""Helpers of the reliability tests: worker processes, the attempt log, backend control."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from worker_fixtures import execute, wait_for

from sqla_graphile.schema import quote_schema

SCRIPT = Path(__file__).parent / "reliability_process.py"


def app_url(database_url: str, application_name: str) -> str:
    """``database_url`` with an ``application_name``, to find the backends it opens."""
    url = make_url(database_url).update_query_dict({"application_name": application_name})
    return url.render_as_string(hide_password=False)


def create_log(engine: Engine, schema: str) -> None:
    """Create ``<schema>.rel_log``, the UNLOGGED attempt log of ``rel_work``."""
    from reliability_process import LOG_TABLE_SQL as ddl

    execute(engine, ddl.format(schema=quote_schema(schema)))


def log_rows(engine: Engine, schema: str, where: str = "true") -> list[Any]:
    """The attempt log, ordered by job and start."""
    return execute(
        engine,
        f"select * from {quote_schema(schema)}.rel_log where {where} order by job_id, started, id",
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


class RelProcess:
    """One ``reliability_process.py`` worker; its output lines are collected."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(SCRIPT.parent),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, fragment: str) -> bool:
        return any(fragment in line for line in list(self.lines))

    def count(self, fragment: str) -> int:
        return sum(fragment in line for line in list(self.lines))

    def wait_line(self, fragment: str, timeout: float = 60.0) -> None:
        wait_for(
            lambda: self.saw(fragment) or self.process.poll() is not None,
            timeout,
            what=f"{fragment!r} from the worker",
        )
        assert self.saw(fragment), f"worker exited without {fragment!r}:\n" + self.tail()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self._reader.join(5)


@contextmanager
def rel_processes(configs: list[dict[str, Any]]) -> Iterator[list[RelProcess]]:
    """Start worker processes; whatever still runs at the end is killed."""
    procs: list[RelProcess] = []
    try:
        for config in configs:
            procs.append(RelProcess(config))
        yield procs
    finally:
        for proc in procs:
            if proc.process.poll() is None:
                proc.kill()


def backends(engine: Engine, application_name: str) -> list[Any]:
    """This database's backends opened with ``application_name``, except our own."""
    return execute(
        engine,
        "select pid, query, state from pg_stat_activity where datname = current_database() "
        "and application_name = :app and pid <> pg_backend_pid()",
        app=application_name,
    )


def terminate_backends(engine: Engine, application_name: str) -> list[int]:
    """Terminate this database's backends opened with ``application_name``; their pids."""
    rows = execute(
        engine,
        "select pid, pg_terminate_backend(pid) as done from pg_stat_activity "
        "where datname = current_database() and application_name = :app "
        "and pid <> pg_backend_pid()",
        app=application_name,
    )
    return [row["pid"] for row in rows if row["done"]]


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def elapsed(start: float) -> float:
    return time.monotonic() - start
