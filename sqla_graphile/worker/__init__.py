"""The worker: runs Python task handlers on Node graphile-worker 0.18's protocol.

::

    from sqla_graphile import Worker

    worker = Worker(engine, [SendEmail, resize_image], concurrency=10)
    worker.run()  # until SIGINT/SIGTERM; run_once() works until nothing is runnable

See :class:`Worker` for the options, :mod:`sqla_graphile.sql.worker` for the protocol's
statements and :mod:`sqla_graphile.hooks` for events and interceptors.
"""

from __future__ import annotations

from .runner import ForbiddenFlags, Worker

__all__ = ["ForbiddenFlags", "Worker"]
