"""The examples under ``examples/``, and the commands of ``examples/README.md`` as written.

The commands run in subprocesses, as a reader of that page runs them: the virtual
environment's scripts first on ``PATH``, ``DATABASE_URL`` and ``GRAPHILE_WORKER_SCHEMA``
set, from the directory the page says.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import Engine, text

from sqla_graphile import WorkerUtils

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
README = EXAMPLES / "README.md"
#: How long a documented command may take to do its work before the test gives up on it.
DEADLINE = 90.0


def documented_commands() -> list[str]:
    """The shell commands of examples/README.md's bash blocks, continuations joined."""
    commands: list[str] = []
    in_bash = False
    pending = ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = shlex.join(shlex.split(pending + line, comments=True))
        pending = ""
        if command:
            commands.append(command)
    return commands


def command(prefix: str) -> list[str]:
    """The one documented command starting with ``prefix``, as argv."""
    found = [c for c in documented_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"examples/README.md documents {found!r} for {prefix!r}"
    return shlex.split(found[0])


WORKER_COMMANDS = [
    c
    for c in documented_commands()
    if c.startswith(("graphile-worker run", "python -m fastapi_orders.worker"))
]


def reader_env(database_url: str, schema: str) -> dict[str, str]:
    """The environment of a reader who followed the page's install steps."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The scripts of this environment (graphile-worker, uvicorn, python) come first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DATABASE_URL"] = database_url
    env["GRAPHILE_WORKER_SCHEMA"] = schema
    return env


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if process.poll() is not None:
            output = process.communicate()[0]
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {DEADLINE} s:\n{process.communicate()[0]}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        output = process.communicate(timeout=DEADLINE)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"did not stop on SIGTERM:\n{process.communicate()[0]}")
    return process.returncode, output


@pytest.fixture
def examples_path() -> Iterator[None]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))
        for name in [
            m for m in sys.modules if m == "fastapi_orders" or m.startswith("fastapi_orders.")
        ]:
            del sys.modules[name]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "script_only_example", EXAMPLES / "script_only.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def script_table(engine: Engine) -> Iterator[None]:
    yield
    with engine.begin() as connection:
        connection.execute(text("drop table if exists script_signups"))


def test_script_only_example(
    database_url: str, engine: Engine, schema_name: str, script_table: None
) -> None:
    script = _load_script()
    rows = script.main(database_url, schema=schema_name)
    assert [email for email, _ in rows] == ["ada@example.com", "grace@example.com"]
    assert all(welcomed and welcomed.startswith("job ") for _, welcomed in rows)
    assert WorkerUtils(engine, schema_name).list_jobs() == []


def test_script_only_command_as_documented(
    database_url: str, engine: Engine, schema_name: str, script_table: None
) -> None:
    result = subprocess.run(
        command("python examples/script_only.py"),
        cwd=ROOT,
        env=reader_env(database_url, schema_name),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ada@example.com", "grace@example.com"]
    assert all(": job " in line for line in lines), lines
    assert WorkerUtils(engine, schema_name).list_jobs() == []


@pytest.fixture
def orders_table(engine: Engine) -> Iterator[None]:
    yield
    with engine.begin() as connection:
        connection.execute(text("drop table if exists orders"))


@pytest.fixture
def orders_app(examples_path: None, orders_table: None) -> Iterator[tuple[ModuleType, ModuleType]]:
    yield (
        importlib.import_module("fastapi_orders.app"),
        importlib.import_module("fastapi_orders.worker"),
    )


def orders(engine: Engine) -> list[tuple[int, str, object]]:
    with engine.connect() as connection:
        return [
            (row.id, row.email, row.confirmation_sent_at)
            for row in connection.execute(
                text("select id, email, confirmation_sent_at from orders order by id")
            )
        ]


def test_fastapi_orders_example(
    orders_app: tuple[ModuleType, ModuleType], database_url: str, engine: Engine, schema: str
) -> None:
    from fastapi.testclient import TestClient

    app_module, worker_module = orders_app
    app = app_module.create_app(database_url, schema=schema)
    utils = WorkerUtils(engine, schema)

    with TestClient(app) as client:
        # The order and its email job commit together.
        response = client.post(
            "/orders", json={"email": "ada@example.com", "item": "book", "quantity": 2}
        )
        assert response.status_code == 201, response.text
        created = response.json()
        assert orders(engine) == [(created["id"], "ada@example.com", None)]
        (job,) = utils.list_jobs()
        assert job.id == created["job_id"]
        assert job.task_identifier == "send_order_email"
        assert job.payload == {"order_id": created["id"], "to": "ada@example.com"}

        # A request that fails after both writes leaves neither.
        declined = client.post(
            "/orders",
            json={
                "email": "mallory@example.com",
                "item": "book",
                "quantity": 1,
                "card_token": "tok_declined",
            },
        )
        assert declined.status_code == 402
        assert [email for _, email, _ in orders(engine)] == ["ada@example.com"]
        assert [j.id for j in utils.list_jobs()] == [created["job_id"]]

        # Invalid input is refused before anything is written.
        assert (
            client.post("/orders", json={"email": "x", "item": "y", "quantity": 0}).status_code
            == 422
        )
        assert len(orders(engine)) == 1

    # The worker runs the job: the order is confirmed, the job is gone.
    worker = worker_module.build_worker(database_url, schema=schema)
    try:
        worker.run_once()
    finally:
        worker.close()
    ((order_id, _, sent_at),) = orders(engine)
    assert order_id == created["id"]
    assert sent_at is not None
    assert utils.list_jobs() == []


def test_the_readme_documents_the_three_worker_commands() -> None:
    assert WORKER_COMMANDS == [
        "graphile-worker run --tasks fastapi_orders.tasks",
        "graphile-worker run --tasks fastapi_orders.tasks --once",
        "python -m fastapi_orders.worker",
    ]


@pytest.mark.parametrize("documented", WORKER_COMMANDS)
def test_documented_worker_command_confirms_the_orders(
    documented: str,
    orders_app: tuple[ModuleType, ModuleType],
    database_url: str,
    engine: Engine,
    schema: str,
) -> None:
    from fastapi.testclient import TestClient

    app_module, _ = orders_app
    utils = WorkerUtils(engine, schema)
    with TestClient(app_module.create_app(database_url, schema=schema)) as client:
        for email in ["ada@example.com", "grace@example.com"]:
            response = client.post("/orders", json={"email": email, "item": "pen", "quantity": 1})
            assert response.status_code == 201, response.text
    assert len(utils.list_jobs()) == 2

    def all_confirmed() -> bool:
        return all(sent_at is not None for _, _, sent_at in orders(engine))

    argv = shlex.split(documented)
    env = reader_env(database_url, schema)
    if "--once" in argv:
        # Bounded by the command itself: it returns when no job is runnable.
        result = subprocess.run(
            argv, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=DEADLINE
        )
        assert result.returncode == 0, result.stderr
    else:
        # Works until SIGTERM: stopped once the orders are confirmed.
        process = subprocess.Popen(
            argv,
            cwd=EXAMPLES,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(all_confirmed, process, "confirmed orders")
        returncode, output = stop(process)
        assert returncode == 0, output
    assert all_confirmed()
    assert len(orders(engine)) == 2
    assert utils.list_jobs() == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_documented_uvicorn_command_serves_the_app(
    orders_table: None, database_url: str, engine: Engine, schema_name: str
) -> None:
    # The page's migrate step, then its server command (on a free port), then its order.
    env = reader_env(database_url, schema_name)
    migrated = subprocess.run(
        command("graphile-worker migrate"),
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*command("uvicorn --factory fastapi_orders.app:create_app"), "--port", str(port)],
        cwd=EXAMPLES,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def serving() -> bool:
        try:
            return httpx.get(f"{base}/openapi.json", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(serving, process, "answer from the server")
        curl = command("curl -X POST")
        body = curl[curl.index("-d") + 1]
        response = httpx.post(
            f"{base}/orders",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
    finally:
        returncode, output = stop(process)
    assert response.status_code == 201, response.text
    created = response.json()
    assert orders(engine) == [(created["id"], "ada@example.com", None)]
    (job,) = WorkerUtils(engine, schema_name).list_jobs()
    assert job.id == created["job_id"]
    # uvicorn ends a graceful shutdown by re-raising the signal it stopped on.
    assert returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
