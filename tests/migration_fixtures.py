"""Helpers of the migration tests: Node's migrations applied by hand, the ledger, catalog
snapshots and a ``worker:migrate`` listener (fixtures ``node_sql`` and ``listener``)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from sqla_graphile.migrations import alembic_config

BREAKING = {1, 3, 11, 13, 14, 16, 19}
EXPECTED_LEDGER = [(n, n in BREAKING) for n in range(1, 21)]
MIGRATE_CHANNEL = "worker:migrate"


def node_quote(name: str) -> str:
    """Quote an identifier the way node-postgres' ``escapeIdentifier`` does (always)."""
    return '"' + name.replace('"', '""') + '"'


def migrate_payload(number: int) -> str:
    return json.dumps({"migrationNumber": number, "breaking": number in BREAKING}).replace(" ", "")


def apply_node_migrations(database_url: str, schema: str, sql_dir: Path, upto: int) -> None:
    """Apply Node's ``sql/000001.sql`` … ``upto`` to ``schema`` as Node's migrator does.

    Bootstrap first (schema and ledger table), then one transaction per file: ledger row
    first, then the file's text with the schema placeholder replaced, then the
    ``worker:migrate`` notification.
    """
    quoted = node_quote(schema)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"create schema if not exists {quoted};"
            f" create table if not exists {quoted}.migrations("
            " id int primary key, ts timestamptz default now() not null);"
            f" alter table {quoted}.migrations"
            " add column if not exists breaking boolean not null default false;"
        )
        for number in range(1, upto + 1):
            source = (sql_dir / f"{number:06d}.sql").read_text()
            breaking = source.startswith("--! breaking")
            body = re.sub(r":GRAPHILE_WORKER_SCHEMA\b", lambda _: quoted, source)
            with conn.transaction():
                conn.execute(
                    f"insert into {quoted}.migrations (id, breaking) values (%s, %s)",
                    (number, breaking),
                )
                conn.execute(body.encode())
                payload = json.dumps(
                    {"migrationNumber": number, "breaking": breaking}, separators=(",", ":")
                )
                conn.execute("select pg_notify(%s, %s)", (MIGRATE_CHANNEL, payload))


@pytest.fixture
def node_sql(node_dir: Path) -> Path:
    return node_dir / "node_modules" / "graphile-worker" / "sql"


class Listener:
    """A separate connection listening on ``worker:migrate``."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def received(self) -> list[str]:
        """Every payload delivered so far (committed before this call), in order.

        A sentinel notification is sent after everything of interest has committed;
        notifications are delivered in commit order, so reading up to the sentinel
        reads everything before it.
        """
        sentinel = f"sentinel-{secrets.token_hex(4)}"
        self.conn.execute("select pg_notify(%s, %s)", (MIGRATE_CHANNEL, sentinel))
        payloads: list[str] = []
        for notify in self.conn.notifies(timeout=30):
            if notify.payload == sentinel:
                return payloads
            payloads.append(notify.payload)
        raise AssertionError(f"the sentinel notification never came; got {payloads}")


@pytest.fixture
def listener(database_url: str) -> Iterator[Listener]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"listen {node_quote(MIGRATE_CHANNEL)}")
        yield Listener(conn)


def ledger(engine: Engine, schema: str) -> list[tuple[int, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"select id, breaking from {node_quote(schema)}.migrations order by id")
        )
        return [(row.id, row.breaking) for row in rows]


def ledger_with_ts(engine: Engine, schema: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select id, breaking, ts, xmin::text"
                f" from {node_quote(schema)}.migrations order by id"
            )
        )
        return [tuple(row) for row in rows]


# Our own objects in the worker schema (Alembic's version table, the worker registry),
# which Node neither has nor sees, with their row and array types.
_ALEMBIC = [
    "alembic\\_version%",
    "\\_alembic\\_version%",
    "\\_sqla\\_graphile%",
    "\\_\\_sqla\\_graphile%",
]

# Catalog rows of every worker object, with their oid and xmin: a CREATE OR REPLACE, an
# ALTER or a drop-and-recreate changes at least one of them. Alembic's own version table
# (kept in the worker schema by the standalone migrator) is left out.
_SNAPSHOT_QUERIES = {
    "classes": """
        select c.relname, c.relkind, c.oid::int8, c.xmin::text, c.relrowsecurity,
               c.relforcerowsecurity, c.relacl::text
          from pg_class c
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:a as text[])))
         order by 1""",
    "attributes": """
        select c.relname, a.attnum, a.attname, a.xmin::text, a.attisdropped,
               format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
               a.attgenerated
          from pg_attribute a join pg_class c on c.oid = a.attrelid
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:a as text[])))
           and a.attnum > 0
         order by 1, 2""",
    "defaults": """
        select c.relname, d.adnum, d.xmin::text, pg_get_expr(d.adbin, d.adrelid)
          from pg_attrdef d join pg_class c on c.oid = d.adrelid
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:a as text[])))
         order by 1, 2""",
    "constraints": """
        select conname, oid::int8, xmin::text, pg_get_constraintdef(oid)
          from pg_constraint
         where connamespace = cast(:s as regnamespace)
           and not (conname like any(cast(:a as text[])))
         order by 1""",
    "indexes": """
        select c.relname, i.xmin::text, pg_get_indexdef(i.indexrelid)
          from pg_index i join pg_class c on c.oid = i.indexrelid
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:a as text[])))
         order by 1""",
    "sequences": """
        select c.relname, s.xmin::text, s.seqtypid::regtype::text, s.seqstart,
               s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle
          from pg_sequence s join pg_class c on c.oid = s.seqrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1""",
    "types": """
        select t.typname, t.oid::int8, t.xmin::text
          from pg_type t
         where t.typnamespace = cast(:s as regnamespace)
           and not (t.typname like any(cast(:a as text[])))
         order by 1""",
    "functions": """
        select p.proname, pg_get_function_identity_arguments(p.oid), p.oid::int8,
               p.xmin::text, pg_get_functiondef(p.oid)
          from pg_proc p
         where p.pronamespace = cast(:s as regnamespace)
         order by 1, 2""",
    "triggers": """
        select t.tgname, t.xmin::text
          from pg_trigger t join pg_class c on c.oid = t.tgrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1""",
    "policies": """
        select p.polname, p.xmin::text
          from pg_policy p join pg_class c on c.oid = p.polrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1""",
    "rewrite": """
        select c.relname, r.rulename, r.xmin::text, pg_get_viewdef(c.oid)
          from pg_rewrite r join pg_class c on c.oid = r.ev_class
         where c.relnamespace = cast(:s as regnamespace)
         order by 1, 2""",
    "namespace": """
        select n.oid::int8, n.xmin::text, n.nspacl::text
          from pg_namespace n where n.nspname = :s""",
}


def catalog_snapshot(engine: Engine, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        snapshot = {
            name: [
                tuple(row)
                for row in conn.execute(text(query), {"s": node_quote(schema), "a": _ALEMBIC})
            ]
            for name, query in _SNAPSHOT_QUERIES.items()
        }
    snapshot["ledger"] = ledger_with_ts(engine, schema)
    return snapshot


def function_defs(engine: Engine, schema: str) -> dict[str, tuple[str, str]]:
    """``{name: (xmin, definition with the schema name normalised)}``."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select proname, xmin::text, pg_get_functiondef(oid) from pg_proc"
                " where pronamespace = cast(:s as regnamespace)"
            ),
            {"s": node_quote(schema)},
        )
        return {
            row[0]: (row[1], row[2].replace(node_quote(schema), "@S").replace(schema, "@S"))
            for row in rows
        }


def our_heads() -> list[str]:
    """The head revisions of the packaged worker migrations."""
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(alembic_config()).get_heads())
