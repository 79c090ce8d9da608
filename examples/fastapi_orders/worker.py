"""The service's worker: ``python -m fastapi_orders.worker`` (``DATABASE_URL`` set).

The same handlers run with the command line too:
``graphile-worker run --tasks fastapi_orders.tasks``.
"""

from __future__ import annotations

import logging
import os

from sqla_graphile import Worker

from .models import engine_for
from .tasks import Sessions, tasks


def build_worker(database_url: str, schema: str = "graphile_worker") -> Worker:
    """A worker for the service's tasks, its handlers' sessions bound to the database."""
    engine = engine_for(database_url)
    Sessions.configure(bind=engine)
    return Worker(engine, tasks, schema=schema, concurrency=10)


def main() -> None:
    """Run the worker until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build_worker(os.environ["DATABASE_URL"]).run()


if __name__ == "__main__":
    main()
