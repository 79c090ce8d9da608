"""A web dashboard of the queue: an ASGI app on Starlette, with server-rendered pages.

Install the extra (``pip install 'sqla-graphile[dashboard]'``), then serve it alone
(``graphile-worker dashboard``) or mount it into a Starlette or FastAPI app::

    from fastapi import FastAPI
    from sqla_graphile.dashboard import create_app

    app = FastAPI()
    app.mount("/queue", create_app(DATABASE_URL, actions=True, authenticate=admin_only))

Pages: the overview (counts by state, by task and queue, throughput, the oldest runnable
job's age), the job list (filters by state, task, queue, key and text in the last error,
keyset-paged), a job, the workers (heartbeats, locks, stale ones) and the cron items.
Actions, when enabled: run now, fail, complete, remove by key, force-unlock a worker,
sweep stale workers; each behind a confirmation page, a CSRF token and an audit line.
Every value is escaped; no script runs on the pages (their CSP forbids any).

The package imports Starlette and Jinja2: without the ``dashboard`` extra, importing it
raises ``ImportError``; nothing else of the library imports it.
"""

from __future__ import annotations

from ._actions import ACTIONS, Action
from ._app import create_app
from ._data import JobFilter, JobRow, JobsPage, Throughput, jobs_page_op
from ._security import CSRF_COOKIE, CSRF_FIELD, Authenticate, audit_logger

__all__ = [
    "ACTIONS",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "Action",
    "Authenticate",
    "JobFilter",
    "JobRow",
    "JobsPage",
    "Throughput",
    "audit_logger",
    "create_app",
    "jobs_page_op",
]
