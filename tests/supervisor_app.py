"""A supervised application for ``test_supervisor.py``, run as a script in its own process.

    python supervisor_app.py '{"url": ..., "schema": ..., "processes": 2, ...}'

It runs :func:`sqla_graphile.supervisor.run_processes` with :class:`App` as the factory
and exits with its status. Each worker process runs the task ``hold``, which records its
runs in ``<schema>.sup_runs`` (job, attempt, pid, event) and sleeps ``payload["seconds"]``
on its first attempt only, and the task ``stuck`` (time limit 0.3 s), which records its
start and then blocks for good, ignoring ``ctx.cancellation``. Recovery uses short
intervals, so that a killed process's jobs are recovered within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text

from sqla_graphile import Worker, WorkerContext, WorkerRecoveryConfig, task
from sqla_graphile._urls import engine_from_url
from sqla_graphile.schema import quote_schema
from sqla_graphile.supervisor import WorkerSlot, run_processes

RECOVERY = WorkerRecoveryConfig(
    heartbeat_interval=timedelta(seconds=0.3),
    sweep_interval=timedelta(seconds=0.5),
    sweep_threshold=timedelta(seconds=2),
    recovery_delay=timedelta(0),
)
#: Exit status of a worker process that crashes as it starts (``"crash": true``).
CRASH_STATUS = 3


def create_runs_table(engine: Engine, schema: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                f"create table {quote_schema(schema)}.sup_runs (id bigserial primary key, "
                "job_id bigint not null, attempt int not null, pid int not null, "
                "event text not null)"
            )
        )


def runs(engine: Engine, schema: str) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"select * from {quote_schema(schema)}.sup_runs order by id")
        )
        return [dict(row) for row in rows.mappings()]


@dataclass(frozen=True)
class App:
    """The worker factory: pickled to each worker process, called there."""

    url: str
    schema: str
    crash: bool = False
    overtime_limit: float | None = 30.0

    def __call__(self, slot: WorkerSlot) -> Worker:
        if self.crash:
            os._exit(CRASH_STATUS)
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s %(name)s [process {slot.index}]: %(message)s",
            stream=sys.stderr,
        )
        engine = engine_from_url(self.url)
        table = f"{quote_schema(self.schema)}.sup_runs"

        def record(ctx: WorkerContext, event: str) -> None:
            with engine.begin() as connection:
                connection.execute(
                    text(
                        f"insert into {table} (job_id, attempt, pid, event) values (:j, :a, :p, :e)"
                    ),
                    {"j": ctx.job.id, "a": ctx.job.attempts, "p": os.getpid(), "e": event},
                )

        @task("hold")
        def hold(payload: Any, ctx: WorkerContext) -> None:
            record(ctx, "start")
            if ctx.job.attempts == 1:
                time.sleep(payload["seconds"])
            record(ctx, "end")

        @task("stuck", timeout=0.3)
        def stuck(payload: Any, ctx: WorkerContext) -> None:
            record(ctx, "start")
            threading.Event().wait()  # never set, and ctx.cancellation is ignored

        return Worker(
            self.url,
            [hold, stuck],
            schema=self.schema,
            concurrency=2,
            poll_interval=0.2,
            local_queue_size=0,
            recovery=RECOVERY,
            overtime_limit=self.overtime_limit,
        )


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    app = App(
        config["url"],
        config["schema"],
        crash=config.get("crash", False),
        overtime_limit=config.get("overtime_limit", 30.0),
    )
    sys.exit(run_processes(app, config["processes"], **config.get("options", {})))
