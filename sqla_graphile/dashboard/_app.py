"""The dashboard's ASGI app: its routes, pages and actions (see :func:`create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import jinja2
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, Router

from .._admin import state_of
from .._format import age, when
from .._urls import async_engine_from_url
from ..admin import JobState
from ..cron import Cron, CrontabSource, load_crontab
from ..errors import InvalidArgument, sqlstate_of
from ..recovery import WorkerRecoveryConfig
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..utils import AsyncWorkerUtils
from ._actions import ACTIONS, ActionError
from ._data import Database, JobFilter, Throughput
from ._security import (
    CSRF_FIELD,
    SECURITY_HEADERS,
    Authenticate,
    Csrf,
    audit_logger,
    operator_of,
)

__all__ = ["create_app"]

logger = logging.getLogger("sqla_graphile.dashboard")

#: The largest form body an action accepts.
_MAX_FORM = 16 * 1024
#: Characters of a payload the job page shows at most.
_MAX_PAYLOAD = 64 * 1024

_Handler = Callable[[Request], Awaitable[Response]]


def _async_engine(bind: AsyncEngine | Engine | str | URL) -> tuple[AsyncEngine, bool]:
    """An async engine for ``bind``, and whether the dashboard made it (and disposes of it)."""
    if isinstance(bind, AsyncEngine):
        return bind, False
    if isinstance(bind, Engine):
        url = bind.url
        if url.drivername not in ("postgresql+psycopg", "postgresql+psycopg_async"):
            raise InvalidArgument(
                f"the dashboard runs on psycopg 3; pass an AsyncEngine or a URL, not an "
                f"engine of {url.drivername!r}"
            )
        return async_engine_from_url(url.set(drivername="postgresql+psycopg_async")), True
    return async_engine_from_url(bind, pool_size=5, max_overflow=5, pool_pre_ping=True), True


def _when(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    delta = now - value
    word = f"{age(delta)} ago" if delta >= timedelta(0) else age(delta)
    return f"{when(value)} ({word})"


class _Dashboard:
    """The state of one app: database, templates, options."""

    def __init__(
        self,
        db: Database,
        *,
        actions: bool,
        authenticate: Authenticate | None,
        crontab: Sequence[Cron],
        page_size: int,
        scan_limit: int,
        stale_threshold: timedelta,
        csrf: Csrf,
        title: str,
    ) -> None:
        self.db = db
        self.actions = actions
        self.authenticate = authenticate
        self.crontab = crontab
        self.page_size = page_size
        self.scan_limit = scan_limit
        self.stale_threshold = stale_threshold
        self.csrf = csrf
        self.title = title
        self.throughput = Throughput()
        self.router = Router()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("sqla_graphile.dashboard", "templates"),
            autoescape=True,  # payloads, errors, keys and names are user data
            undefined=jinja2.StrictUndefined,
        )

    # -- rendering ------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        token, fresh = self.csrf.token(request)

        def url(name: str, path_params: dict[str, Any] | None = None, **params: Any) -> str:
            # By the dashboard's own routes under its mount point: names of the app it is
            # mounted into never collide with them.
            path = str(request.scope.get("root_path", "")) + str(
                self.router.url_path_for(name, **(path_params or {}))
            )
            query = {k: str(v) for k, v in params.items() if v not in (None, "")}
            return path + ("?" + urllib.parse.urlencode(query) if query else "")

        html = self.templates.get_template(template).render(
            request=request,
            url=url,
            title=self.title,
            schema=self.db.schema,
            actions_enabled=self.actions,
            operator=request.state.operator,
            csrf_field=CSRF_FIELD,
            csrf_token=token,
            when=_when,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
        if fresh is not None:
            self.csrf.set_cookie(request, response, fresh)
        return response

    def error(self, request: Request, status: int, message: str) -> Response:
        if not hasattr(request.state, "operator"):
            request.state.operator = None
        return self.render(request, "error.html", status, page="", status=status, message=message)

    def guarded(self, handler: _Handler) -> _Handler:
        """``handler`` behind the hook, with database errors shown as pages."""

        async def endpoint(request: Request) -> Response:
            try:
                operator = await operator_of(request, self.authenticate)
            except HTTPException as exc:
                request.state.operator = None
                response = self.error(request, exc.status_code, str(exc.detail))
                response.headers.update(exc.headers or {})
                return response
            if operator is None:
                return self.error(request, 403, "Not allowed: the dashboard refused this request.")
            request.state.operator = operator
            try:
                return await handler(request)
            except HTTPException as exc:
                return self.error(request, exc.status_code, str(exc.detail))
            except DBAPIError as exc:
                if sqlstate_of(exc) == "57014":  # query_canceled: the statement timeout
                    return self.error(request, 503, "The query took longer than allowed.")
                logger.exception("dashboard query failed")
                return self.error(request, 503, "The database could not answer.")

        return endpoint

    # -- pages --------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        data = await self.db.overview(self.throughput)
        groups = data.groups[:200]
        return self.render(
            request,
            "overview.html",
            page="overview",
            data=data,
            groups=groups,
            more_groups=len(data.groups) - len(groups),
            oldest=age(data.stats.oldest_ready_age),
        )

    def _filter(self, request: Request) -> JobFilter:
        query = request.query_params

        def given(name: str) -> str | None:
            value = query.get(name, "").strip()
            return value[:512] or None

        state = query.get("state") or JobState.ALL.value
        try:
            job_state = JobState(state)
        except ValueError:
            raise HTTPException(400, f"unknown state {state!r}") from None
        before = query.get("before", "")
        if before and not before.isdigit():
            raise HTTPException(400, "before must be a job id")
        return JobFilter(
            job_state,
            given("task"),
            given("queue"),
            given("key"),
            given("text"),
            int(before) if before else None,
        )

    async def jobs(self, request: Request) -> Response:
        where = self._filter(request)
        page = await self.db.jobs(where, limit=self.page_size, scan=self.scan_limit)
        return self.render(
            request,
            "jobs.html",
            page="jobs",
            where=where,
            jobs=page,
            states=[state.value for state in JobState],
            filters=where.params(),
        )

    async def job(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        job, now = await self.db.job(job_id)
        if job is None:
            raise HTTPException(404, f"No job {job_id}: it finished, was removed, or never was.")
        payload = json.dumps(job.payload, indent=2, ensure_ascii=False, sort_keys=True)
        cut = len(payload) > _MAX_PAYLOAD
        return self.render(
            request,
            "job.html",
            page="jobs",
            job=job,
            now=now,
            state=state_of(job.locked_at, job.attempts, job.max_attempts, job.run_at, now).value,
            payload=payload[:_MAX_PAYLOAD],
            payload_cut=cut,
        )

    async def workers(self, request: Request) -> Response:
        data = await self.db.workers(self.stale_threshold)
        registered = {worker.worker_id for worker in data.registered}
        return self.render(
            request,
            "workers.html",
            page="workers",
            data=data,
            unregistered=[h for h in data.holders if h.worker_id not in registered],
            holders={h.worker_id: h for h in data.holders},
            now=data.now,
        )

    async def cron(self, request: Request) -> Response:
        rows, now = await self.db.cron(self.crontab)
        return self.render(
            request, "cron.html", page="cron", rows=rows, now=now, crontab=bool(self.crontab)
        )

    # -- actions ------------------------------------------------------------------

    def _action(self, request: Request) -> Any:
        if not self.actions:
            raise HTTPException(403, "Actions are disabled: the dashboard is read-only.")
        action = ACTIONS.get(request.path_params["name"])
        if action is None:
            raise HTTPException(404, "No such action.")
        return action

    async def confirm(self, request: Request) -> Response:
        action = self._action(request)
        params = {name: request.query_params.get(name, "") for name in action.target}
        return self.render(
            request,
            "confirm.html",
            page="",
            action=action,
            params=params,
            description=action.describe(params),
        )

    async def perform(self, request: Request) -> Response:
        action = self._action(request)
        length = int(request.headers.get("content-length") or 0)
        if length > _MAX_FORM:
            raise HTTPException(413, "Form too large.")
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind != "application/x-www-form-urlencoded":
            raise HTTPException(415, "Actions take a form (application/x-www-form-urlencoded).")
        raw = b""
        async for chunk in request.stream():  # a chunked body has no length to check
            raw += chunk
            if len(raw) > _MAX_FORM:
                raise HTTPException(413, "Form too large.")
        body = raw.decode("utf-8", "replace")
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body, max_num_fields=20).items()}
        operator = request.state.operator
        description = action.describe(form)
        if not self.csrf.valid(request, form.get(CSRF_FIELD)):
            audit_logger.warning("refused (bad CSRF token) %s by %s", description, operator)
            raise HTTPException(403, "The form's CSRF token is missing or wrong: reload the page.")
        try:
            async with self.db.transaction(read_only=False) as connection:
                outcome = await action.run(
                    AsyncWorkerUtils(connection, self.db.schema), form, operator
                )
        except ActionError as exc:
            raise HTTPException(400, str(exc)) from None
        except Exception as exc:
            audit_logger.warning("failed %s by %s: %s", description, operator, exc)
            raise
        audit_logger.info(
            "%s by %s: %s",
            description,
            operator,
            outcome,
            extra={"action": action.name, "operator": operator, "params": form},
        )
        return self.render(
            request, "done.html", page="", action=action, outcome=outcome, params=form
        )


def create_app(
    bind: AsyncEngine | Engine | str | URL,
    *,
    schema: str = DEFAULT_SCHEMA,
    actions: bool = False,
    authenticate: Authenticate | None = None,
    crontab: CrontabSource = None,
    statement_timeout: float = 5.0,
    page_size: int = 50,
    scan_limit: int = 50_000,
    stale_threshold: timedelta | None = None,
    secret_key: bytes | str | None = None,
    sample_interval: float | None = 15.0,
    title: str = "Graphile Worker",
) -> Starlette:
    """The dashboard as an ASGI app, to serve alone or mount into a Starlette/FastAPI app.

    ``bind``: an ``AsyncEngine``, a psycopg 3 ``Engine`` (its URL is used) or a URL.
    ``actions`` enables the operator's actions (read-only otherwise). ``authenticate``
    is given each request and returns the operator's name, or ``None`` to refuse it
    (see :mod:`sqla_graphile.dashboard`). ``crontab`` (text, a file or ``Cron`` items)
    gives the cron page its schedules and next runs. Each request's statements are
    bounded by ``statement_timeout`` seconds; the job list shows ``page_size`` jobs and
    looks at ``scan_limit`` jobs at most per page when filtering. A worker is shown
    stale past ``stale_threshold`` (default: the recovery sweep threshold).
    ``secret_key`` signs the CSRF tokens (give one when several processes serve the
    dashboard). Every ``sample_interval`` seconds, while the app's lifespan runs, the
    throughput is sampled (the overview page samples too).
    """
    schema = validate_schema_name(schema)
    if page_size < 1 or scan_limit < page_size:
        raise InvalidArgument("page_size must be positive and scan_limit at least page_size")
    if statement_timeout <= 0:
        raise InvalidArgument("statement_timeout must be positive")
    engine, owned = _async_engine(bind)
    dashboard = _Dashboard(
        Database(engine, schema, statement_timeout),
        actions=actions,
        authenticate=authenticate,
        crontab=load_crontab(crontab),
        page_size=page_size,
        scan_limit=scan_limit,
        stale_threshold=stale_threshold or WorkerRecoveryConfig().sweep_threshold,
        csrf=Csrf(secret_key),
        title=title,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler = None
        if sample_interval:
            sampler = asyncio.create_task(_sample(dashboard, sample_interval))
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            if owned:
                await engine.dispose()

    guarded = dashboard.guarded
    routes = [
        Route("/", guarded(dashboard.overview), name="overview"),
        Route("/jobs", guarded(dashboard.jobs), name="jobs"),
        Route("/jobs/{job_id:int}", guarded(dashboard.job), name="job"),
        Route("/workers", guarded(dashboard.workers), name="workers"),
        Route("/cron", guarded(dashboard.cron), name="cron"),
        Route("/actions/{name}", guarded(dashboard.confirm), methods=["GET"], name="confirm"),
        Route("/actions/{name}", guarded(dashboard.perform), methods=["POST"], name="perform"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    dashboard.router = app.router
    app.state.dashboard = dashboard
    return app


async def _sample(dashboard: _Dashboard, interval: float) -> None:
    while True:
        try:
            await dashboard.db.sample(dashboard.throughput)
        except Exception:
            logger.warning("throughput sample failed", exc_info=True)
        await asyncio.sleep(interval)
