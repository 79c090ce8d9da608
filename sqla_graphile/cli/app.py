"""The ``graphile-worker`` group: its global options, shared state and error reporting.

The commands register themselves on :func:`main` from the modules of this package.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click
from sqlalchemy import Engine

from .._format import to_jsonable
from .._urls import engine_from_url, normalize_url, url_secrets
from ..schema import DEFAULT_SCHEMA, validate_schema_name
from ..utils import WorkerUtils
from .errors import Error, Reported, before_double_dash, classify, render

__all__ = ["SUPPORTED_URLS", "State", "emit", "main", "pass_state"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The database URLs the command line takes (it talks to PostgreSQL through psycopg 3).
SUPPORTED_URLS = "postgresql://, postgres:// or postgresql+psycopg:// (psycopg 3)"


def _checked_url(url: str) -> str:
    """``url`` if the command line can use it, else a usage error naming what it takes."""
    try:
        parsed = normalize_url(url)
    except Exception:  # whatever SQLAlchemy says, the URL itself is not echoed
        raise click.UsageError(
            f"--database-url is not a database URL; use {SUPPORTED_URLS}"
        ) from None
    if parsed.drivername != "postgresql+psycopg":
        scheme = url.partition("://")[0]
        named = f"{scheme}://" if re.fullmatch(r"[A-Za-z][\w+.-]*", scheme) else "this scheme"
        raise click.UsageError(f"--database-url: {named} is not supported; use {SUPPORTED_URLS}")
    return url


@dataclasses.dataclass
class State:
    """The global options, and the engine and utils made from them on first use."""

    database_url: str | None
    schema: str
    as_json: bool
    verbose: bool
    _engine: Engine | None = None
    _utils: WorkerUtils | None = None

    def url(self) -> str:
        """The database URL; a usage error when there is none or it is not usable."""
        if not self.database_url:
            raise click.UsageError("no database: pass --database-url or set DATABASE_URL")
        return _checked_url(self.database_url)

    def engine(self) -> Engine:
        """The engine of :meth:`url`, made once."""
        if self._engine is None:
            self._engine = engine_from_url(self.url())
        return self._engine

    def utils(self) -> WorkerUtils:
        """Worker utils on :meth:`engine` and the schema, made once."""
        if self._utils is None:
            self._utils = WorkerUtils(self.engine(), self.schema)
        return self._utils

    def close(self) -> None:
        """Dispose of the engine, if one was made (the command has ended)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = self._utils = None


class _Group(click.Group):
    """Reports every error by the rules of the CLI reference (its "Exit status and errors")."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        json_asked = "--json" in before_double_dash(args)  # parsing consumes ``args``
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if not json_asked:
                raise
            error = Error(exc.format_message(), "usage", exc.exit_code)
            raise Reported(
                render(error, as_json=True, verbose=False, secrets=()), exc.exit_code
            ) from None

    def invoke(self, ctx: click.Context) -> Any:
        # --json after the command name is only seen once the command's options are parsed:
        # the raw arguments tell whether an error before that must be JSON too.
        protected = getattr(ctx, "_protected_args", None)  # click < 8.2: protected_args
        pending = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        json_asked = bool(ctx.params.get("as_json")) or "--json" in before_double_dash(pending)
        verbose = bool(ctx.params.get("verbose"))
        url = ctx.params.get("database_url")
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, Reported):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # a closed pipe (`| head`): click exits quietly
            state = ctx.find_object(State)
            as_json = json_asked or (state is not None and state.as_json)
            if isinstance(exc, click.ClickException) and not as_json:
                raise  # click's own report, with the usage line
            error = classify(exc, url)
            rendered = render(error, as_json=as_json, verbose=verbose, secrets=url_secrets(url))
            raise Reported(rendered, error.exit_code) from None
        finally:
            state = ctx.find_object(State)
            if state is not None:
                state.close()


def _json_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    state = ctx.find_object(State)
    if value and state is not None:
        state.as_json = True


def pass_state(fn: _F) -> _F:
    """Pass the global state, and accept ``--json`` after the command name too."""
    with_json = click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_json_after_command,
        help="Machine-readable JSON output (same as the global --json).",
    )
    return with_json(click.pass_obj(fn))  # type: ignore[return-value]


def emit(state: State, data: Any, human: str) -> None:
    """Print a command's result: ``data`` as JSON with ``--json``, else ``human``."""
    if state.as_json:
        click.echo(json.dumps(to_jsonable(data), ensure_ascii=False))
    else:
        click.echo(human)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help=f"PostgreSQL URL: {SUPPORTED_URLS} (default: $DATABASE_URL).",
)
@click.option(
    "--schema",
    envvar="GRAPHILE_WORKER_SCHEMA",
    default=DEFAULT_SCHEMA,
    show_default=True,
    help="Worker schema (also $GRAPHILE_WORKER_SCHEMA).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors; debug logging.")
@click.version_option(package_name="sqla-graphile")
@click.pass_context
def main(
    ctx: click.Context, database_url: str | None, schema: str, as_json: bool, verbose: bool
) -> None:
    """Operate a Graphile Worker job queue: migrate, add, inspect, fix jobs; run workers."""
    try:
        validate_schema_name(schema)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--schema") from None
    ctx.obj = State(database_url, schema, as_json, verbose)
