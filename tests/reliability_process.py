"""A worker process for the reliability tests: every attempt is logged by the database clock.

Usage: ``python reliability_process.py CONFIG_JSON``. The ``rel_work`` task records each
attempt in the UNLOGGED table ``<schema>.rel_log`` (start and end by ``clock_timestamp()``,
job id, attempt number, queue, worker id, outcome) through a connection of its own, so
the log survives the termination of the worker's own connections. An attempt fails when
its payload says so or at random with ``fail_rate``; ``sleep`` seconds make it slow
(only its first run with ``sleep_once``).

Config keys: ``url``, ``log_url``, ``schema``, ``worker_id``, ``concurrency``,
``poll_interval``, ``complete_batch_delay``, ``fail_rate``, ``seed``, ``once``,
``log_level``, ``announce`` (print ``STARTED <id> <attempt>`` / ``FINISHED …`` lines),
``recovery`` (seconds: ``heartbeat``, ``sweep``, ``threshold``, ``delay``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sqla_graphile import Worker, WorkerContext, task
from sqla_graphile._urls import async_engine_from_url
from sqla_graphile.schema import quote_schema

LOG_TABLE_SQL = """
create unlogged table if not exists {schema}.rel_log (
  id bigserial primary key,
  job_id bigint not null,
  attempt int not null,
  queue_name text,
  worker_id text not null,
  started timestamptz not null,
  finished timestamptz,
  outcome text
)
"""

_config: dict[str, Any] = {}
_engine: AsyncEngine | None = None
_random = random.Random()


class InjectedFailure(Exception):
    """The failure this attempt was chosen for."""


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@task("rel_work")
async def rel_work(payload: Any, ctx: WorkerContext) -> None:
    assert _engine is not None
    schema = quote_schema(_config["schema"])
    job = ctx.job
    async with _engine.connect() as connection:
        log_id = (
            await connection.execute(
                text(
                    f"insert into {schema}.rel_log (job_id, attempt, queue_name, worker_id, "
                    "started) values (:job, :attempt, :queue, :worker, clock_timestamp()) "
                    "returning id"
                ),
                {
                    "job": job.id,
                    "attempt": job.attempts,
                    "queue": job.queue_name,
                    "worker": ctx.worker_id,
                },
            )
        ).scalar_one()
        earlier = 0
        if isinstance(payload, dict) and payload.get("sleep_once"):
            earlier = (
                await connection.execute(
                    text(f"select count(*) from {schema}.rel_log where job_id = :job and id < :id"),
                    {"job": job.id, "id": log_id},
                )
            ).scalar_one()
        await connection.commit()
    if _config.get("announce"):
        say(f"STARTED {job.id} {job.attempts}")
    sleep = payload.get("sleep", 0) if isinstance(payload, dict) else 0
    if earlier:
        sleep = 0
    if sleep:
        await asyncio.sleep(sleep)
    fail = bool(isinstance(payload, dict) and payload.get("fail")) or (
        _random.random() < _config.get("fail_rate", 0.0)
    )
    try:
        async with _engine.connect() as connection:
            await connection.execute(
                text(
                    f"update {schema}.rel_log set finished = clock_timestamp(), "
                    "outcome = :outcome where id = :id"
                ),
                {"id": log_id, "outcome": "fail" if fail else "ok"},
            )
            await connection.commit()
    except BaseException as exc:
        say(f"LOGERROR job {job.id} attempt {job.attempts}: {type(exc).__name__}: {exc}")
        raise
    if _config.get("announce"):
        say(f"FINISHED {job.id} {job.attempts}")
    if fail:
        raise InjectedFailure(f"injected failure of job {job.id} attempt {job.attempts}")


async def main(config: dict[str, Any]) -> None:
    global _engine
    _config.update(config)
    _random.seed(config.get("seed"))
    concurrency = int(config.get("concurrency", 8))
    # Few connections: four of these processes and their workers must fit PostgreSQL's
    # default max_connections (100) beside the test itself.
    _engine = async_engine_from_url(
        config.get("log_url", config["url"]), pool_size=2, max_overflow=1, pool_timeout=300
    )
    options: dict[str, Any] = {}
    recovery = config.get("recovery")
    if recovery:
        from sqla_graphile import WorkerRecoveryConfig

        options["recovery"] = WorkerRecoveryConfig(
            enabled=True,
            heartbeat_interval=timedelta(seconds=recovery["heartbeat"]),
            sweep_interval=timedelta(seconds=recovery["sweep"]),
            sweep_threshold=timedelta(seconds=recovery["threshold"]),
            recovery_delay=timedelta(seconds=recovery["delay"]),
        )
    worker = Worker(
        config["url"],
        [rel_work],
        schema=config["schema"],
        concurrency=concurrency,
        poll_interval=float(config.get("poll_interval", 0.5)),
        complete_batch_delay=float(config.get("complete_batch_delay", 0.0)),
        worker_id=config.get("worker_id"),
        shutdown_grace_period=float(config.get("grace", 30.0)),
        **options,
    )
    say(f"WORKER {worker.worker_id}")
    try:
        # Signals are handled by the worker itself (run / run_once install handlers);
        # here it runs on this process's loop, so they are installed by hand.
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.request_shutdown)
        if config.get("once"):
            await worker.run_once_async()
        else:
            await worker.run_async()
    finally:
        worker.close()
        await _engine.dispose()
    say("EXITED")


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(
        level=getattr(logging, cfg.get("log_level", "INFO")),
        stream=sys.stdout,
        format="%(levelname)s %(name)s %(message)s",
    )
    asyncio.run(main(cfg))
