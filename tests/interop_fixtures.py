"""Driving real Node graphile-worker@0.18.0 processes from the interop tests.

``NodeProcess`` runs ``tests/node/interop.mjs`` and talks to it in JSON lines: requests
(start a worker pool, run once, add jobs, call ``workerUtils``) and their replies, plus
events (pool created, LISTEN established, cron started). Python tasks here record what
they receive into the same log table as the Node tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from sqla_graphile import WorkerContext, task
from sqla_graphile.schema import quote_schema

REPLY_TIMEOUT = 90.0
EVENT_TIMEOUT = 60.0


class NodeProcess:
    """One ``node interop.mjs`` process; see that script for the operations."""

    def __init__(
        self, node_dir: Path, database_url: str, log_path: Path, *, clock_offset_ms: int = 0
    ) -> None:
        node = shutil.which("node")
        assert node is not None
        config = {"connectionString": database_url, "clockOffsetMs": clock_offset_ms}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHILE_WORKER")}
        env.pop("DATABASE_URL", None)
        self.log_path = log_path
        self._stderr = log_path.open("w")
        self.process = subprocess.Popen(
            [node, str(node_dir / "interop.mjs"), json.dumps(config)],
            cwd=node_dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="node-interop")
        self._reader.start()
        self.wait_event(lambda e: e["event"] == "ready", what="the Node process to start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.startswith("@@ "):
                continue
            message = json.loads(line[3:])
            with self._changed:
                if "reply" in message:
                    future = self._pending.pop(message["reply"], None)
                    if future is not None:
                        if "error" in message:
                            future.set_exception(NodeError(message["error"]))
                        else:
                            future.set_result(message["result"])
                else:
                    self._events.append(message)
                self._changed.notify_all()
        with self._changed:
            for future in self._pending.values():
                future.set_exception(NodeError(f"the Node process exited\n{self.stderr_tail()}"))
            self._pending.clear()
            self._changed.notify_all()

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def send(self, op: str, **arguments: Any) -> Future[Any]:
        """Send a request; its reply resolves the future."""
        future: Future[Any] = Future()
        request_id = next(self._ids)
        with self._changed:
            if self.process.poll() is not None:
                raise NodeError(f"the Node process has exited\n{self.stderr_tail()}")
            self._pending[request_id] = future
        line = json.dumps({"id": request_id, "op": op, **arguments}, default=str)
        with self._write_lock:
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        return future

    def call(self, op: str, timeout: float = REPLY_TIMEOUT, **arguments: Any) -> Any:
        return self.send(op, **arguments).result(timeout)

    async def acall(self, op: str, timeout: float = REPLY_TIMEOUT, **arguments: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self.send(op, **arguments)), timeout)

    def events(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self._events if predicate(e)]

    def wait_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = EVENT_TIMEOUT,
        what: str = "a Node event",
    ) -> dict[str, Any]:
        with self._changed:
            found = self._changed.wait_for(
                lambda: (
                    next((e for e in self._events if predicate(e)), None)
                    or self.process.poll() is not None
                ),
                timeout,
            )
            match = next((e for e in self._events if predicate(e)), None)
        if match is None:
            state = "exited" if found else "timed out"
            raise AssertionError(f"{state} waiting for {what}\n{self.stderr_tail()}")
        return match

    async def await_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = EVENT_TIMEOUT,
        what: str = "a Node event",
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_event, predicate, timeout, what)

    def start_pool(
        self,
        name: str,
        schema: str,
        tasks: dict[str, dict[str, Any]],
        *,
        concurrency: int = 1,
        poll_interval_ms: int = 2000,
        crontab: str | None = None,
        wait_listening: bool = True,
    ) -> str:
        """``run()`` a worker pool; returns its pool id (the ``locked_by`` of its jobs)."""
        result = self.call(
            "start",
            name=name,
            schema=schema,
            tasks=tasks,
            concurrency=concurrency,
            pollInterval=poll_interval_ms,
            crontab=crontab,
        )
        if wait_listening:
            self.wait_event(
                lambda e: e["event"] == "listening" and e["name"] == name,
                what=f"Node pool {name} to LISTEN",
            )
        return str(result["poolId"])

    async def astart_pool(self, *args: Any, **kwargs: Any) -> str:
        return await asyncio.to_thread(self.start_pool, *args, **kwargs)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its jobs stay locked by its pool."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._reader.join(30)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                with self._write_lock:
                    self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                    self.process.stdin.flush()
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(30)
        self._reader.join(30)
        self._stderr.close()


class NodeError(Exception):
    """An operation failed in the Node process (the message carries its stack)."""


@pytest.fixture(scope="module", name="node")
def node_fixture(
    node_dir: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """One long-lived Node process for a test module."""
    process = NodeProcess(
        node_dir, database_url, tmp_path_factory.mktemp("node") / "node-stderr.log"
    )
    try:
        yield process
    finally:
        process.close()


# -- the log table both sides write ---------------------------------------------------


def make_log(engine: Engine, schema: str, name: str = "interop_log") -> str:
    """Create the log table in ``schema``; returns its quoted qualified name."""
    table = f"{quote_schema(schema)}.{name}"
    with engine.begin() as connection:
        connection.execute(
            text(
                f"create table {table} (job_id bigint not null, attempt int not null,"
                " who text not null, task text not null, queue_name text, job jsonb not null,"
                " started timestamptz not null, ended timestamptz)"
            )
        )
    return table


def log_rows(engine: Engine, table: str, where: str = "true") -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [
            dict(row)
            for row in connection.execute(
                text(f"select * from {table} where {where} order by started, job_id")
            ).mappings()
        ]


def recording_task(
    identifier: str, table: str, *, sleep: float = 0.0, fail: str | None = None
) -> Any:
    """A Python task that records what it receives, as the Node tasks do, then may fail."""

    @task(identifier)
    async def record(payload: Any, ctx: WorkerContext) -> None:
        assert ctx.async_utils is not None
        engine = ctx.async_utils.bind
        assert isinstance(engine, AsyncEngine)
        job = {**asdict(ctx.job), "payload": payload}
        job["flags"] = sorted(job["flags"]) if job["flags"] is not None else None
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    f"insert into {table} (job_id, attempt, who, task, queue_name, job, started)"
                    " values (:id, :attempt, 'python', :task, :queue, cast(:job as jsonb),"
                    " clock_timestamp())"
                ),
                {
                    "id": ctx.job.id,
                    "attempt": ctx.job.attempts,
                    "task": ctx.job.task_identifier,
                    "queue": ctx.job.queue_name,
                    "job": json.dumps(job, default=str),
                },
            )
        if sleep:
            await asyncio.sleep(sleep)
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    f"update {table} set ended = clock_timestamp() where job_id = :id"
                    " and attempt = :attempt and who = 'python' and ended is null"
                ),
                {"id": ctx.job.id, "attempt": ctx.job.attempts},
            )
        if fail is not None:
            raise RuntimeError(fail)

    return record
