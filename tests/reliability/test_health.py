"""Health: ``graphile-worker health`` against good and broken databases, and the HTTP
endpoint of a running worker (``run --health-port``, ``serve_health``): 200 while it
works, 503 once its shutdown begins or while it is fenced."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

from netproxy import PgProxy
from sqlalchemy import Engine, text
from worker_fixtures import await_for, running, wait_for

import sqla_graphile
from sqla_graphile import Worker, WorkerContext, WorkerRecoveryConfig, WorkerUtils, task
from sqla_graphile.health import check_health, serve_health
from sqla_graphile.schema import quote_schema

ROOT = Path(sqla_graphile.__file__).resolve().parent.parent
WAIT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, method: str = "GET") -> tuple[int, Any] | None:
    """``(status, JSON body)`` of the endpoint, or None while nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    except OSError:
        return None
    finally:
        connection.close()


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "GRAPHILE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def cli(url: str, schema: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "sqla_graphile", "--database-url", url, "--schema", schema, *args]


def health(url: str, schema: str, *args: str) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        cli(url, schema, "--json", "health", *args),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return result.returncode, json.loads(result.stdout), result.stderr


def checks(report: dict[str, Any]) -> dict[str, bool]:
    return {check["name"]: check["ok"] for check in report["checks"]}


def add_registry_rows(engine: Engine, schema: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                f"insert into {quote_schema(schema)}._sqla_graphile_workers "
                "(worker_id, last_heartbeat_at) values ('w-fresh', now()), "
                "('w-stale', now() - interval '10 minutes')"
            )
        )


# -- graphile-worker health -------------------------------------------------------------------


def test_health_of_a_migrated_schema(database_url: str, schema: str) -> None:
    code, report, _ = health(database_url, schema)
    assert code == 0
    assert report["healthy"] is True
    assert checks(report) == {"database": True, "schema": True}


def test_health_in_text_lists_each_check(database_url: str, schema: str) -> None:
    result = subprocess.run(
        cli(database_url, schema, "health"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    database: reachable (PostgreSQL ")
    assert lines[1].startswith(f"ok    schema: '{schema}' at migration 20")
    assert lines[-1] == "healthy"


def test_health_of_an_unmigrated_schema(database_url: str, schema_name: str) -> None:
    code, report, _ = health(database_url, schema_name)
    assert code == 1
    assert report["healthy"] is False
    assert checks(report) == {"database": True, "schema": False}
    assert "not migrated" in report["checks"][1]["detail"]


def test_health_of_a_schema_newer_than_the_library(
    engine: Engine, database_url: str, schema: str
) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(f"insert into {quote_schema(schema)}.migrations (id, breaking) values (21, true)")
        )
    code, report, _ = health(database_url, schema)
    assert code == 1
    assert checks(report) == {"database": True, "schema": False}
    assert "21" in report["checks"][1]["detail"]


def test_health_of_an_unreachable_database(schema: str) -> None:
    url = "postgresql://operator:pw-S3cret@127.0.0.1:1/jobs"
    code, report, stderr = health(url, schema)
    assert code == 1
    assert checks(report) == {"database": False}
    assert report["checks"][0]["detail"].startswith("unreachable: ")
    assert "S3cret" not in json.dumps(report) + stderr


def test_health_of_workers_by_their_heartbeat(
    engine: Engine, database_url: str, schema: str
) -> None:
    add_registry_rows(engine, schema)

    code, report, _ = health(database_url, schema, "--worker-id", "w-fresh")
    assert (code, checks(report)["worker w-fresh"]) == (0, True)

    code, report, _ = health(database_url, schema, "--worker-id", "w-stale")
    assert (code, checks(report)["worker w-stale"]) == (1, False)
    assert "older than 5.0 min" in report["checks"][-1]["detail"]

    code, report, _ = health(database_url, schema, "--worker-id", "w-fresh", "--threshold", "1h")
    assert code == 0

    code, report, _ = health(database_url, schema, "--worker-id", "nobody")
    assert (code, report["checks"][-1]["detail"]) == (1, "not registered")

    code, report, _ = health(database_url, schema, "--min-workers", "1")
    assert (code, checks(report)["workers"]) == (0, True)
    code, report, _ = health(database_url, schema, "--min-workers", "2")
    assert (code, checks(report)["workers"]) == (1, False)


def test_check_health_from_python(engine: Engine, schema: str) -> None:
    add_registry_rows(engine, schema)
    report = check_health(engine, schema, worker_ids=["w-stale"], threshold=timedelta(hours=1))
    assert report.healthy
    assert [check.name for check in report.checks] == ["database", "schema", "worker w-stale"]


# -- the endpoint of graphile-worker run --------------------------------------------------------

HANGING_TASKS = textwrap.dedent(
    """
    import asyncio

    from sqla_graphile import task


    @task("hang")
    async def hang(payload, ctx):
        await asyncio.sleep(3600)
    """
)


def test_run_serves_ready_until_its_shutdown_begins(
    engine: Engine, database_url: str, schema: str, tmp_path: Path
) -> None:
    (tmp_path / "hang_tasks.py").write_text(HANGING_TASKS, encoding="utf-8")
    port = free_port()
    utils = WorkerUtils(engine, schema)
    args = cli(database_url, schema, "run", "--tasks", "hang_tasks", "--health-port", str(port))
    args += ["--shutdown-grace-period", "60s"]
    process = subprocess.Popen(
        args, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        ready = wait_for(
            lambda: (answer := get(port, "/readyz")) and answer[0] == 200 and answer,
            WAIT,
            "the worker to be ready",
        )
        live = get(port, "/livez")
        head = get(port, "/readyz", method="HEAD")
        missing = get(port, "/metrics")
        job = utils.add_raw_job("hang", {})
        wait_for(lambda: (j := utils.get_job(job.id)) and j.locked_by, WAIT, "the job to start")
        process.send_signal(signal.SIGTERM)  # the job hangs: the shutdown lasts its grace
        stopping = wait_for(
            lambda: (answer := get(port, "/readyz")) and answer[0] == 503 and answer,
            WAIT,
            "readiness to fail",
        )
        live_while_stopping = get(port, "/livez")
        process.send_signal(signal.SIGTERM)  # forced: the job is failed at once
        process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0
    _, body = ready
    assert body["status"] == "ok"
    assert body["worker"]["ready"] and body["worker"]["listening"] and body["worker"]["recovery"]
    assert live is not None and live[0] == 200
    assert head == (200, None)
    assert missing is not None and missing[0] == 404
    assert stopping[1]["status"] == "unavailable"
    assert stopping[1]["worker"]["problems"] == ["shutting down"]
    assert live_while_stopping is not None and live_while_stopping[0] == 200


def test_run_with_a_port_in_use_is_an_error(database_url: str, schema: str, tmp_path: Path) -> None:
    (tmp_path / "hang_tasks.py").write_text(HANGING_TASKS, encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            cli(database_url, schema, "run", "--tasks", "hang_tasks", "--health-port", str(port)),
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot serve the health endpoint on 127.0.0.1:{port}: Address already in use"
    )


# -- a fenced worker ------------------------------------------------------------------------------

RECOVERY = WorkerRecoveryConfig(
    heartbeat_interval=timedelta(seconds=0.3),
    sweep_interval=timedelta(seconds=0.5),
    sweep_threshold=timedelta(seconds=2),
    recovery_delay=timedelta(seconds=0.5),
)


@task("health_noop")
async def noop(payload: Any, ctx: WorkerContext) -> None:
    """Never run here: the worker needs a task."""


async def test_the_endpoint_fails_while_the_worker_is_fenced(
    schema: str, pg_proxy: PgProxy
) -> None:
    worker = Worker(
        pg_proxy.url,
        [noop],
        schema=schema,
        poll_interval=0.2,
        statement_timeout=1.0,
        shutdown_grace_period=1.0,
        recovery=RECOVERY,
    )
    server = serve_health(worker, 0)
    port = server.address[1]

    async def answer(path: str) -> tuple[int, Any] | None:
        return await asyncio.to_thread(get, port, path)

    async def status_is(path: str, code: int) -> Any:
        found = await answer(path)
        return found if found is not None and found[0] == code else None

    async with running(worker):
        await await_for(lambda: status_is("/readyz", 200), WAIT, "readiness")
        pg_proxy.partition()
        try:
            await await_for(lambda: worker.fenced, WAIT, "the fence")
            fenced = await answer("/readyz")
            live = await answer("/livez")
        finally:
            pg_proxy.heal()
        await await_for(lambda: status_is("/livez", 200), WAIT, "the end of the fence")
        await await_for(lambda: status_is("/readyz", 200), WAIT, "readiness again")

    assert await answer("/livez") is None  # closed with the worker
    assert live is not None and live[0] == 503
    assert fenced is not None and fenced[0] == 503
    problems = fenced[1]["worker"]["problems"]
    assert "fenced: its heartbeats failed for longer than its lease" in problems


async def test_serve_health_serves_each_run_of_the_worker(database_url: str, schema: str) -> None:
    worker = Worker(database_url, [noop], schema=schema, poll_interval=0.2)
    server = serve_health(worker, 0)
    port = server.address[1]
    assert await asyncio.to_thread(get, port, "/livez") is None  # not before the run
    for _ in range(2):
        async with running(worker):
            answer = await await_for(
                lambda: asyncio.to_thread(get, port, "/readyz"), WAIT, "an answer"
            )
            await await_for(lambda: worker.status.ready, WAIT, "readiness")
            ready = await asyncio.to_thread(get, port, "/readyz")
        assert answer is not None
        assert ready is not None and ready[0] == 200
        assert await asyncio.to_thread(get, port, "/livez") is None  # closed with the run
