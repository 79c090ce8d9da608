"""What the two benchmarks share: their options, the schemas they make, the environment line."""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url

from sqla_graphile import __version__, migrate
from sqla_graphile.schema import quote_schema


def parser(description: str, *, quick: str, repeats: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; ``quick`` and ``repeats`` are their help texts."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (default: $DATABASE_URL); schemas bench_* are made and dropped",
    )
    result.add_argument("--quick", action="store_true", help=quick)
    result.add_argument("--repeats", type=int, help=repeats)
    result.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    result.add_argument("--node", default=shutil.which("node"), help="the node executable")
    return result


def database_url(args: argparse.Namespace, parser: argparse.ArgumentParser) -> URL:
    """The plain libpq URL given, or a usage error."""
    if not args.database_url:
        parser.error("give --database-url or set DATABASE_URL")
    return make_url(args.database_url).set(drivername="postgresql")


def node_version(node: str) -> str:
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def versions(engine: Engine, node: str | None) -> dict[str, Any]:
    """Versions of everything measured, for the first line and the JSON file."""
    with engine.connect() as connection:
        server = connection.scalar(text("show server_version"))
    return {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "sqla_graphile": __version__,
        "node": node_version(node) if node else None,
        "postgresql": server,
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


@dataclass
class Schemas:
    """The worker schemas a benchmark makes (``bench_<token>_<name>``), dropped at the end."""

    url: URL
    engine: Engine
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    schemas: list[str] = field(default_factory=list)

    @property
    def conninfo(self) -> str:
        return self.url.render_as_string(hide_password=False)

    def fresh_schema(self, name: str) -> str:
        schema = f"bench_{self.token}_{name}"
        self.schemas.append(schema)
        migrate(self.engine, schema=schema)
        return schema

    def drop_schemas(self) -> None:
        with self.engine.begin() as connection:
            for schema in self.schemas:
                connection.execute(text(f"drop schema if exists {quote_schema(schema)} cascade"))
        self.schemas.clear()
