"""The service's worker: ``python -m fastapi_orders.worker``, from ``examples/``.

It reads ``DATABASE_URL`` and ``GRAPHILE_WORKER_SCHEMA`` (default ``graphile_worker``)
as the app and the command line do; the same handlers run with
``graphile-worker run --tasks fastapi_orders.tasks``.
"""

from __future__ import annotations

import logging

from sqla_graphile import Worker

from .models import engine_for, settings
from .tasks import tasks


def build_worker(database_url: str | None = None, schema: str | None = None) -> Worker:
    """A worker for the service's tasks, on ``database_url`` and ``schema`` (or settings)."""
    url, worker_schema = settings(database_url, schema)
    return Worker(engine_for(url), tasks, schema=worker_schema, concurrency=10)


def main() -> None:
    """Run the worker until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build_worker().run()


if __name__ == "__main__":
    main()
