"""A worker in a process of its own, for the shutdown tests (signals, exit, writes).

Usage: ``python worker_process.py URL SCHEMA GRACE_PERIOD COMPLETE_BATCH_DELAY``. The
``sleepy`` task prints ``STARTED <id>`` and ``FINISHED <id>`` around its sleep.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from sqla_graphile import Worker, WorkerContext, task


@task("sleepy")
def sleepy(payload: Any, ctx: WorkerContext) -> None:
    say(f"STARTED {ctx.job.id}")
    time.sleep(payload["seconds"])
    say(f"FINISHED {ctx.job.id}")


def say(line: str) -> None:
    # One write per line: handler threads print concurrently.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    url, schema, grace, delay = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
    Worker(
        url,
        [sleepy],
        schema=schema,
        shutdown_grace_period=float(grace),
        complete_batch_delay=float(delay),
        poll_interval=0.2,
    ).run()
    say("EXITED")
