"""A worker with crash recovery, run in-process or in a process of its own.

As a script: ``python recovery_process.py URL SCHEMA CONCURRENCY``. Its ``sleepy`` task
records ``started`` in ``<schema>.recovery_runs``, prints ``STARTED <id>``, sleeps
``payload["seconds"]``, then records ``finished``. It prints ``WORKER <worker id>`` first.

Until ``Worker`` takes a ``recovery=`` option itself, :func:`run_recovering` wires a
:class:`RecoveryAgent` around ``run_async`` the way the worker does: register before the
first fetch, heartbeat and sweep while running, deregister after a clean exit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text

from sqla_graphile import Worker, WorkerContext, WorkerRecoveryConfig, task
from sqla_graphile._urls import async_engine_from_url, engine_from_url
from sqla_graphile.schema import quote_schema
from sqla_graphile.worker.recovery import RecoveryAgent

#: Whether ``Worker`` has its own ``recovery=`` option.
WIRED = "recovery" in inspect.signature(Worker).parameters

#: Short intervals, so a crash is recovered within seconds.
FAST = WorkerRecoveryConfig(
    enabled=True,
    heartbeat_interval=timedelta(seconds=0.2),
    sweep_interval=timedelta(seconds=0.3),
    sweep_threshold=timedelta(seconds=1),
    recovery_delay=timedelta(seconds=0.2),
)


def make_worker(bind: Any, tasks: list[Any], config: WorkerRecoveryConfig, **kw: Any) -> Worker:
    """A worker that will run with ``config`` (through its own option when it has one)."""
    if WIRED:
        kw["recovery"] = config
    return Worker(bind, tasks, **kw)


async def run_recovering(worker: Worker, config: WorkerRecoveryConfig, url: str) -> None:
    """``worker.run_async()`` with crash recovery by ``config``."""
    if WIRED:
        await worker.run_async()
        return
    engine = async_engine_from_url(url)
    agent = RecoveryAgent(
        engine,
        worker.schema,
        worker.worker_id,
        config,
        task_identifiers=worker.task_identifiers,
        hooks=worker.hooks,
    )
    try:
        await agent.register()
        agent.start()
        clean = False
        try:
            await worker.run_async()
            clean = True
        finally:
            await agent.stop(deregister=clean)
    finally:
        await engine.dispose()


def record_run(engine: Engine, schema: str, job_id: int, worker_id: str, phase: str) -> None:
    """One row in ``<schema>.recovery_runs`` (created by the test)."""
    with engine.begin() as connection:
        connection.execute(
            text(
                f"insert into {quote_schema(schema)}.recovery_runs (job_id, worker_id, phase) "
                "values (:job_id, :worker_id, :phase)"
            ),
            {"job_id": job_id, "worker_id": worker_id, "phase": phase},
        )


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    url, schema, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
    engine = engine_from_url(url)

    @task("sleepy")
    def sleepy(payload: Any, ctx: WorkerContext) -> None:
        record_run(engine, schema, ctx.job.id, ctx.worker_id, "started")
        say(f"STARTED {ctx.job.id}")
        time.sleep(payload["seconds"])
        record_run(engine, schema, ctx.job.id, ctx.worker_id, "finished")

    worker = make_worker(
        url, [sleepy], FAST, schema=schema, concurrency=concurrency, poll_interval=0.2
    )
    say(f"WORKER {worker.worker_id}")
    asyncio.run(run_recovering(worker, FAST, url))


if __name__ == "__main__":
    main()
