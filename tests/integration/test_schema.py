"""The Core objects of ``sqla_graphile.schema`` against a migrated database.

The migrated schema is compared with the Core tables twice: through SQLAlchemy's
inspector, and through PostgreSQL's own rendering of both (the Core tables are created in
a scratch schema, then catalog definitions of the two schemas are compared verbatim).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    CheckConstraint,
    Connection,
    DefaultClause,
    Engine,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import DropSchema

from sqla_graphile import InvalidSchemaName, MigrationError, migrate, worker_schema
from sqla_graphile._urls import engine_from_url
from sqla_graphile.functions import worker_functions
from sqla_graphile.schema import quote_schema, validate_schema_name

PG = postgresql.dialect()  # type: ignore[no-untyped-call]

CORE_TABLES = ("_private_jobs", "_private_job_queues", "_private_tasks", "_private_known_crontabs")
LEDGER = "migrations"
# sqla-graphile's own table (never in Graphile's ledger), declared with the others.
REGISTRY = "_sqla_graphile_workers"

VIEW_COLUMNS = [
    "id",
    "queue_name",
    "task_identifier",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "last_error",
    "created_at",
    "updated_at",
    "key",
    "locked_at",
    "locked_by",
    "revision",
    "flags",
]


def _type_sql(type_: Any) -> str:
    return str(type_.compile(dialect=PG))


# --- Core tables vs the migrated database, through the inspector ---------------------------


def test_migrated_schema_holds_the_core_tables_and_the_view(engine: Engine, schema: str) -> None:
    ws = worker_schema(schema)
    insp = inspect(engine)
    found = set(insp.get_table_names(schema=schema))
    described = {table.name for table in ws.metadata.tables.values()}
    assert {*CORE_TABLES, LEDGER, REGISTRY} <= described
    assert described <= found
    # Besides the described tables: only the standalone Alembic version table.
    assert found - described <= {"alembic_version"}
    assert insp.get_view_names(schema=schema) == ["jobs"]


@pytest.mark.parametrize("table_name", [*CORE_TABLES, LEDGER, REGISTRY])
def test_core_table_matches_reflection(engine: Engine, schema: str, table_name: str) -> None:
    ws = worker_schema(schema)
    core = ws.metadata.tables[f"{schema}.{table_name}"]
    insp = inspect(engine)

    reflected = insp.get_columns(table_name, schema=schema)
    assert [c["name"] for c in reflected] == [c.name for c in core.columns]
    for column, found in zip(core.columns, reflected, strict=True):
        where = f"{table_name}.{column.name}"
        assert _type_sql(found["type"]) == _type_sql(column.type), where
        assert found["nullable"] == column.nullable, where
        default = column.server_default
        expected_default = str(default.arg) if isinstance(default, DefaultClause) else None
        assert found.get("default") == expected_default, where
        assert bool(found.get("identity")) == (column.identity is not None), where
        if column.identity is not None:
            assert found["identity"]["always"] is True, where
        assert bool(found.get("computed")) == (column.computed is not None), where
        if column.computed is not None:
            assert found["computed"]["persisted"] is True, where

    pk = insp.get_pk_constraint(table_name, schema=schema)
    assert pk["name"] == core.primary_key.name
    assert pk["constrained_columns"] == [c.name for c in core.primary_key.columns]

    core_uniques = {
        c.name: [col.name for col in c.columns]
        for c in core.constraints
        if isinstance(c, UniqueConstraint)
    }
    found_uniques = {
        u["name"]: u["column_names"] for u in insp.get_unique_constraints(table_name, schema=schema)
    }
    assert found_uniques == core_uniques

    core_checks = {c.name for c in core.constraints if isinstance(c, CheckConstraint)}
    found_checks = {c["name"] for c in insp.get_check_constraints(table_name, schema=schema)}
    assert found_checks == core_checks

    core_indexes = {
        i.name: (
            [c.name for c in i.columns],
            list(i.dialect_options["postgresql"]["include"] or []),
        )
        for i in core.indexes
    }
    found_indexes = {
        i["name"]: (i["column_names"], i["dialect_options"].get("postgresql_include", []))
        for i in insp.get_indexes(table_name, schema=schema)
        if not i.get("duplicates_constraint")
    }
    assert found_indexes == core_indexes


def test_core_objects_render_like_the_migrated_ones(engine: Engine, schema: str) -> None:
    """PostgreSQL's own rendering of columns, constraints and indexes is identical."""
    ws = worker_schema(schema)
    scratch = f"core_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(text(f"create schema {quote_schema(scratch)}"))
        ws.metadata.create_all(connection.execution_options(schema_translate_map={schema: scratch}))
    try:
        with engine.connect() as connection:
            migrated = _catalog(connection, schema)
            core = _catalog(connection, scratch)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"drop schema {quote_schema(scratch)} cascade"))
    assert migrated["columns"] == core["columns"]
    assert migrated["constraints"] == core["constraints"]
    assert migrated["indexes"] == core["indexes"]
    # The facts the comparison rests on are really there.
    key_check = "CHECK (((length(key) > 0) AND (length(key) <= 512)))"
    assert ("_private_jobs", "jobs_key_check", "c", key_check) in migrated["constraints"]
    no_queue = "WHERE ((is_available = true) AND (job_queue_id IS NULL))"
    assert any(no_queue in definition for _, _, definition in migrated["indexes"])
    assert any(name == "_sqla_graphile_workers_heartbeat_idx" for _, name, _ in core["indexes"])


def _catalog(connection: Connection, schema: str) -> dict[str, list[Any]]:
    params = {"s": schema, "t": [*CORE_TABLES, LEDGER, REGISTRY]}
    columns = connection.execute(
        text(
            """
            select c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated
              from pg_attribute a
              join pg_class c on c.oid = a.attrelid
              join pg_namespace n on n.oid = c.relnamespace
              left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
             where n.nspname = :s and c.relkind = 'r' and c.relname = any(:t)
               and a.attnum > 0 and not a.attisdropped
             order by 1, 2
            """
        ),
        params,
    ).all()
    constraints = connection.execute(
        text(
            """
            select c.relname, o.conname, o.contype, pg_get_constraintdef(o.oid)
              from pg_constraint o
              join pg_class c on c.oid = o.conrelid
              join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = :s and c.relname = any(:t)
               -- PostgreSQL 18 also lists NOT NULL constraints, named after the table's
               -- history; Core cannot name them, and nullability is compared with the
               -- columns above.
               and o.contype <> 'n'
             order by 1, 2
            """
        ),
        params,
    ).all()
    indexes = connection.execute(
        text(
            """
            select t.relname, i.relname,
                   replace(pg_get_indexdef(i.oid), quote_ident(:s) || '.', '')
              from pg_index x
              join pg_class i on i.oid = x.indexrelid
              join pg_class t on t.oid = x.indrelid
              join pg_namespace n on n.oid = t.relnamespace
             where n.nspname = :s and t.relname = any(:t)
             order by 1, 2
            """
        ),
        params,
    ).all()
    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
    }


def test_core_jobs_view_matches_the_database_view(engine: Engine, schema: str) -> None:
    ws = worker_schema(schema)
    found = inspect(engine).get_columns("jobs", schema=schema)
    assert [c["name"] for c in found] == VIEW_COLUMNS
    assert [c.name for c in ws.jobs.columns] == VIEW_COLUMNS
    for column, reflected in zip(ws.jobs.columns, found, strict=True):
        assert _type_sql(reflected["type"]) == _type_sql(column.type), column.name
    # The view is never part of the metadata that describes creatable tables.
    assert ws.jobs.metadata is not ws.metadata
    assert "payload" not in ws.jobs.c


def test_job_spec_type_names_the_composite_type(engine: Engine, schema: str) -> None:
    ws = worker_schema(schema)
    with engine.connect() as connection:
        attributes = connection.execute(
            text(
                "select a.attname, format_type(a.atttypid, a.atttypmod)"
                "  from pg_attribute a join pg_type t on t.typrelid = a.attrelid"
                " where t.oid = cast(:t as regtype) and a.attnum > 0 order by a.attnum"
            ),
            {"t": _type_sql(ws.job_spec)},
        ).all()
    assert attributes == [
        ("identifier", "text"),
        ("payload", "json"),
        ("queue_name", "text"),
        ("run_at", "timestamp with time zone"),
        ("max_attempts", "smallint"),
        ("job_key", "text"),
        ("priority", "smallint"),
        ("flags", "text[]"),
    ]


def test_select_from_the_jobs_view_of_a_non_default_schema(engine: Engine, schema: str) -> None:
    ws = worker_schema(schema)
    gw = worker_functions(schema)
    stmt = select(ws.jobs.c.task_identifier, ws.jobs.c.run_at)
    assert f"FROM {schema}.jobs" in str(stmt.compile(dialect=PG))
    with engine.begin() as connection:
        added = connection.execute(select(gw.rows_of(gw.add_job("view_task")))).one()
        rows = connection.execute(stmt.order_by(ws.jobs.c.id)).all()
    assert rows == [("view_task", added.run_at)]
    assert rows[0].run_at.tzinfo is not None


# --- schema names with odd characters, end to end ------------------------------------------

ODD_NAMES = [
    pytest.param("My Schema", id="space-and-case"),
    pytest.param('"; drop table x; --', id="injection"),
    pytest.param("ünïcødé_схема_🚀", id="unicode"),
    pytest.param("é" * 31 + "x", id="63-bytes-multibyte"),
    pytest.param("s" * 63, id="63-bytes-ascii"),
    pytest.param("pct%s %(x)s :colon$body$tag\\", id="percent-colon-dollar-backslash"),
]


@pytest.fixture
def odd_schema(request: pytest.FixtureRequest, engine: Engine) -> Iterator[str]:
    name: str = request.param
    with engine.begin() as connection:
        connection.execute(DropSchema(name, cascade=True, if_exists=True))
        connection.execute(text("create table if not exists public.x (id int)"))
    yield name
    with engine.begin() as connection:
        connection.execute(DropSchema(name, cascade=True, if_exists=True))
        connection.execute(text("drop table if exists public.x"))


@pytest.mark.parametrize("odd_schema", ODD_NAMES, indirect=True)
def test_odd_schema_names_work_end_to_end(engine: Engine, odd_schema: str) -> None:
    name = odd_schema
    assert len(name.encode()) <= 63
    migrate(engine, schema=name)
    ws = worker_schema(name)
    gw = worker_functions(name)
    specs = json.dumps([{"identifier": "batch", "payload": {"n": 2}, "queue_name": "q:%s"}])
    with engine.begin() as connection:
        one = connection.execute(
            select(gw.rows_of(gw.add_job("odd", '{"n": 1}', queue_name="q:%s", job_key="k")))
        ).one()
        many = connection.execute(select(gw.rows_of(gw.add_jobs(gw.specs_from_json(specs))))).all()
    with engine.connect() as connection:
        exact = connection.scalar(
            text("select count(*) from pg_namespace where nspname = :n"), {"n": name}
        )
        ledger = connection.execute(select(ws.migrations.c.id).order_by(ws.migrations.c.id))
        view = connection.execute(
            select(ws.jobs.c.task_identifier, ws.jobs.c.queue_name, ws.jobs.c.key).order_by(
                ws.jobs.c.id
            )
        ).all()
        payloads = connection.scalars(
            select(ws.private_jobs.c.payload).order_by(ws.private_jobs.c.id)
        ).all()
        sentinel = connection.scalar(select(text("to_regclass('public.x') is not null")))
    assert exact == 1  # the schema carries exactly this name, not a truncated one
    assert list(ledger.scalars()) == list(range(1, 21))
    assert len(many) == 1 and many[0].id > one.id
    assert view == [("odd", "q:%s", "k"), ("batch", "q:%s", None)]
    assert payloads == [{"n": 1}, {"n": 2}]
    assert sentinel is True  # nothing was injected


@pytest.mark.parametrize("odd_schema", ODD_NAMES[:3], indirect=True)
def test_odd_schema_names_downgrade_cleanly(engine: Engine, odd_schema: str) -> None:
    from alembic import command

    from sqla_graphile.migrations import alembic_config

    migrate(engine, schema=odd_schema)
    config = alembic_config(odd_schema)
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
        connection.commit()
    with engine.connect() as connection:
        relations = connection.execute(
            text(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                " where n.nspname = :n and c.relkind in ('r', 'v') order by 1"
            ),
            {"n": odd_schema},
        ).all()
    # Standalone, only the (now empty) version table is left behind.
    assert relations == [("alembic_version",)]


# --- names that cannot be schema names -------------------------------------------------------

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("s" * 64, id="64-bytes-ascii"),
    pytest.param("é" * 32, id="64-bytes-multibyte"),
    pytest.param("nul\x00byte", id="nul"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_schema_names_raise_invalid_schema_name(engine: Engine, name: str) -> None:
    for call in (validate_schema_name, quote_schema, worker_schema, worker_functions):
        with pytest.raises(InvalidSchemaName):
            call(name)
    with pytest.raises(InvalidSchemaName):
        migrate(engine, schema=name)
    assert issubclass(InvalidSchemaName, ValueError)
    # Nothing was created under the name PostgreSQL would have truncated it to.
    if len(name.encode()) > 63:
        with engine.connect() as connection:
            truncated = name.encode()[:63].decode(errors="ignore")
            assert not connection.scalar(
                text("select exists (select 1 from pg_namespace where nspname = :n)"),
                {"n": truncated},
            )


# --- migrating without the rights to ---------------------------------------------------------


def test_migrating_as_a_role_that_cannot_create_the_schema(
    login_role: tuple[str, str], schema_name: str, engine: Engine
) -> None:
    _, url = login_role
    restricted = engine_from_url(url, poolclass=NullPool)
    try:
        with pytest.raises(MigrationError) as info:
            migrate(restricted, schema=schema_name)
    finally:
        restricted.dispose()
    message = str(info.value)
    assert "permission denied" in message
    assert repr(schema_name) in message
    assert "role that may create it" in message
    assert info.value.__cause__ is not None
    with engine.connect() as connection:
        assert not connection.scalar(
            text("select exists (select 1 from pg_namespace where nspname = :n)"),
            {"n": schema_name},
        )


def test_migrating_a_precreated_schema_the_role_does_not_own(
    login_role: tuple[str, str], schema_name: str, engine: Engine
) -> None:
    role, url = login_role
    with engine.begin() as connection:
        connection.execute(text(f"create schema {quote_schema(schema_name)}"))
        connection.execute(text(f'grant usage on schema {quote_schema(schema_name)} to "{role}"'))
    restricted = engine_from_url(url, poolclass=NullPool)
    try:
        with pytest.raises(MigrationError, match="permission denied"):
            migrate(restricted, schema=schema_name)
    finally:
        restricted.dispose()
    with engine.connect() as connection:
        assert connection.scalar(select(text(f"to_regclass('{schema_name}.migrations')"))) is None
