"""The examples under ``examples/``, run against the test database."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine, text

from sqla_graphile import WorkerUtils

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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


def test_script_only_example(database_url: str, engine: Engine, schema_name: str) -> None:
    script = _load_script()
    try:
        rows = script.main(database_url, schema=schema_name)
        assert [email for email, _ in rows] == ["ada@example.com", "grace@example.com"]
        assert all(welcomed and welcomed.startswith("job ") for _, welcomed in rows)
        assert WorkerUtils(engine, schema_name).list_jobs() == []
    finally:
        with engine.begin() as connection:
            connection.execute(text("drop table if exists script_signups"))


@pytest.fixture
def orders_app(
    examples_path: None, database_url: str, engine: Engine, schema: str
) -> Iterator[tuple[ModuleType, ModuleType]]:
    app_module = importlib.import_module("fastapi_orders.app")
    worker_module = importlib.import_module("fastapi_orders.worker")
    try:
        yield app_module, worker_module
    finally:
        with engine.begin() as connection:
            connection.execute(text("drop table if exists orders"))


def test_fastapi_orders_example(
    orders_app: tuple[ModuleType, ModuleType], database_url: str, engine: Engine, schema: str
) -> None:
    from fastapi.testclient import TestClient

    app_module, worker_module = orders_app
    app = app_module.create_app(database_url, schema=schema)
    utils = WorkerUtils(engine, schema)

    def orders() -> list[tuple[int, str, object]]:
        with engine.connect() as connection:
            return [
                (row.id, row.email, row.confirmation_sent_at)
                for row in connection.execute(
                    text("select id, email, confirmation_sent_at from orders order by id")
                )
            ]

    with TestClient(app) as client:
        # The order and its email job commit together.
        response = client.post(
            "/orders", json={"email": "ada@example.com", "item": "book", "quantity": 2}
        )
        assert response.status_code == 201, response.text
        created = response.json()
        assert orders() == [(created["id"], "ada@example.com", None)]
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
        assert [email for _, email, _ in orders()] == ["ada@example.com"]
        assert [j.id for j in utils.list_jobs()] == [created["job_id"]]

        # Invalid input is refused before anything is written.
        assert (
            client.post("/orders", json={"email": "x", "item": "y", "quantity": 0}).status_code
            == 422
        )
        assert len(orders()) == 1

    # The worker runs the job: the order is confirmed, the job is gone.
    worker = worker_module.build_worker(database_url, schema=schema)
    try:
        worker.run_once()
    finally:
        worker.close()
    ((order_id, _, sent_at),) = orders()
    assert order_id == created["id"]
    assert sent_at is not None
    assert utils.list_jobs() == []
