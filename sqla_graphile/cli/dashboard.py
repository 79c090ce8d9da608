"""``graphile-worker dashboard``: serve the web dashboard (needs the ``dashboard`` extra)."""

from __future__ import annotations

import importlib
import ipaddress
from pathlib import Path
from typing import Any

import click

from .app import State, main, pass_state
from .params import POSITIVE_DURATION

__all__ = ["dashboard"]

EXTRA_MISSING = "the dashboard needs the 'dashboard' extra: pip install 'sqla-graphile[dashboard]'"


def _callable(spec: str) -> Any:
    """``module:attribute`` imported; a usage error naming what is wrong otherwise."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise click.BadParameter("write module:function", param_hint="--authenticate")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(
            f"cannot import {spec}: {exc}", param_hint="--authenticate"
        ) from None
    if not callable(found):
        raise click.BadParameter(f"{spec} is not callable", param_hint="--authenticate")
    return found


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--enable-actions",
    is_flag=True,
    help="Allow the operator's actions (run now, fail, complete, remove, force-unlock, "
    "sweep); read-only without.",
)
@click.option(
    "--authenticate",
    metavar="MODULE:FUNCTION",
    help="A function given each request, returning the operator's name or None to refuse.",
)
@click.option(
    "--crontab",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The crontab file the workers run, for the cron page's schedules and next runs.",
)
@click.option(
    "--statement-timeout",
    type=POSITIVE_DURATION,
    default="5s",
    show_default=True,
    help="Bound on each query of a request.",
)
@click.option(
    "--page-size", type=click.IntRange(1, 500), default=50, show_default=True, help="Jobs a page."
)
@click.option(
    "--secret-key",
    envvar="GRAPHILE_WORKER_DASHBOARD_SECRET",
    help="Key signing the CSRF tokens (also $GRAPHILE_WORKER_DASHBOARD_SECRET); random if unset.",
)
@click.option("--root-path", default="", help="The path prefix a proxy serves the dashboard at.")
@pass_state
def dashboard(
    state: State,
    host: str,
    port: int,
    enable_actions: bool,
    authenticate: str | None,
    crontab: Path | None,
    statement_timeout: Any,
    page_size: int,
    secret_key: str | None,
    root_path: str,
) -> None:
    """Serve the web dashboard: overview, jobs, workers, cron; actions when enabled.

    Needs the 'dashboard' extra. Listens on 127.0.0.1:8000 by default; put it behind
    your own authentication (--authenticate, or a proxy) before exposing it.
    """
    try:
        import uvicorn

        from ..dashboard import create_app
    except ImportError:
        raise click.ClickException(EXTRA_MISSING) from None
    hook = _callable(authenticate) if authenticate else None
    if enable_actions and hook is None and not _loopback(host):
        click.echo(
            "warning: actions are enabled without --authenticate on a non-loopback address",
            err=True,
        )
    app = create_app(
        state.url(),
        schema=state.schema,
        actions=enable_actions,
        authenticate=hook,
        crontab=crontab,
        statement_timeout=statement_timeout.total_seconds(),
        page_size=page_size,
        secret_key=secret_key,
    )
    click.echo(f"dashboard on http://{host}:{port}{root_path}/", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        root_path=root_path,
        log_level="debug" if state.verbose else "info",
    )
