"""Node graphile-worker 0.18 and this library share one schema.

Node migrates one schema with its own CLI, our revisions migrate another in the same
database, and the two are compared through the catalogs (function bodies aside). Node
is then started on our schema, and the SQL functions of both schemas are run through the
same scripted scenarios, whose outcomes must match.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine, text

from sqla_graphile import migrate

pytestmark = pytest.mark.node

INSERT_CHANNEL = "jobs:insert"
MIGRATE_CHANNEL = "worker:migrate"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run_node(
    node_dir: Path, database_url: str, schema: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Node's ``graphile-worker`` CLI (the fixture's local install) on ``schema``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHILE_WORKER")}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [
            str(node_dir / "node_modules" / ".bin" / "graphile-worker"),
            "--connection",
            database_url,
            "--schema",
            schema,
            *args,
        ],
        cwd=cwd or node_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def node_migrate(node_dir: Path, database_url: str, schema: str) -> None:
    result = run_node(node_dir, database_url, schema, "--schema-only")
    assert result.returncode == 0, result.stdout + result.stderr


def drop_schema(engine: Engine, schema: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"drop schema if exists {quote(schema)} cascade"))


# --- the catalog signature of a worker schema -----------------------------------------

# Our own objects in the worker schema (Alembic's version table, the worker registry),
# which Node neither has nor sees, with their row and array types.
_EXCLUDED = [
    "alembic\\_version%",
    "\\_alembic\\_version%",
    "\\_sqla\\_graphile%",
    "\\_\\_sqla\\_graphile%",
]

_SIGNATURE_QUERIES = {
    "relations": """
        select c.relname, c.relkind from pg_class c
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:x as text[])))
         order by 1""",
    "types": """
        select t.typname, t.typtype from pg_type t
         where t.typnamespace = cast(:s as regnamespace)
           and not (t.typname like any(cast(:x as text[])))
         order by 1""",
    "columns": """
        select c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, a.attidentity, a.attgenerated,
               pg_get_expr(d.adbin, d.adrelid) as default_or_generation,
               a.attcollation <> 0 as collatable
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid
          left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:x as text[])))
           and c.relkind in ('r', 'p', 'v', 'c') and a.attnum > 0 and not a.attisdropped
         order by c.relname, a.attnum""",
    "row_security": """
        select c.relname, c.relrowsecurity, c.relforcerowsecurity from pg_class c
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:x as text[])))
           and c.relkind in ('r', 'p')
         order by 1""",
    "constraints": """
        select cl.relname, co.conname, co.contype, pg_get_constraintdef(co.oid),
               co.condeferrable, co.condeferred
          from pg_constraint co left join pg_class cl on cl.oid = co.conrelid
         where co.connamespace = cast(:s as regnamespace)
           and not (co.conname like any(cast(:x as text[])))
         order by 2""",
    "indexes": """
        select c.relname, pg_get_indexdef(i.indexrelid), i.indisunique, i.indisprimary
          from pg_index i join pg_class c on c.oid = i.indexrelid
         where c.relnamespace = cast(:s as regnamespace)
           and not (c.relname like any(cast(:x as text[])))
         order by 1""",
    "sequences": """
        select c.relname, s.seqtypid::regtype::text, s.seqstart, s.seqincrement, s.seqmax,
               s.seqmin, s.seqcache, s.seqcycle,
               (select t.relname || '.' || a.attname || ':' || d.deptype::text
                  from pg_depend d
                  join pg_class t on t.oid = d.refobjid
                  join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                 where d.classid = 'pg_class'::regclass and d.objid = c.oid
                   and d.refclassid = 'pg_class'::regclass) as owned_by
          from pg_sequence s join pg_class c on c.oid = s.seqrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1""",
    "functions": """
        select p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               l.lanname, p.provolatile, p.proisstrict, p.prosecdef, p.proretset,
               p.prokind, p.proparallel, p.proleakproof, p.proconfig, p.pronargdefaults
          from pg_proc p join pg_language l on l.oid = p.prolang
         where p.pronamespace = cast(:s as regnamespace)
         order by 1, 2""",
    "triggers": """
        select c.relname, t.tgname from pg_trigger t join pg_class c on c.oid = t.tgrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1, 2""",
    "policies": """
        select c.relname, p.polname from pg_policy p join pg_class c on c.oid = p.polrelid
         where c.relnamespace = cast(:s as regnamespace)
         order by 1, 2""",
    "comments": """
        select d.classoid::regclass::text, d.objsubid, d.description
          from pg_description d
          left join pg_class c on d.classoid = 'pg_class'::regclass and c.oid = d.objoid
          left join pg_proc p on d.classoid = 'pg_proc'::regclass and p.oid = d.objoid
         where c.relnamespace = cast(:s as regnamespace)
            or p.pronamespace = cast(:s as regnamespace)
         order by 1, 2, 3""",
}


def catalog_signature(engine: Engine, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything Node's schema promises, as comparable rows with the schema name removed."""

    def normalise(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(quote(schema), "@S").replace(schema, "@S")
        if isinstance(value, list):
            return [normalise(v) for v in value]
        return value

    with engine.connect() as conn:
        return {
            name: [
                tuple(normalise(v) for v in row)
                for row in conn.execute(text(query), {"s": quote(schema), "x": _EXCLUDED})
            ]
            for name, query in _SIGNATURE_QUERIES.items()
        }


def test_our_schema_matches_the_schema_node_migrates(
    node_dir: Path, database_url: str, engine: Engine, schema_name: str
) -> None:
    node_schema = f"gwnode_{secrets.token_hex(4)}"
    try:
        node_migrate(node_dir, database_url, node_schema)
        migrate(engine, schema=schema_name)
        node = catalog_signature(engine, node_schema)
        ours = catalog_signature(engine, schema_name)
    finally:
        drop_schema(engine, node_schema)

    assert set(ours) == set(node)
    for part in node:
        assert ours[part] == node[part], f"{part} differ from Node's"

    # The comparison covered what it claims to cover.
    tables = {row[0] for row in node["row_security"]}
    assert tables == {
        "migrations",
        "_private_jobs",
        "_private_job_queues",
        "_private_tasks",
        "_private_known_crontabs",
    }
    assert [row[2] for row in node["columns"] if row[0] == "job_spec"] == [
        "identifier",
        "payload",
        "queue_name",
        "run_at",
        "max_attempts",
        "job_key",
        "priority",
        "flags",
    ]
    assert {row[0] for row in node["functions"]} == {
        "add_job",
        "add_jobs",
        "complete_jobs",
        "force_unlock_workers",
        "permanently_fail_jobs",
        "remove_job",
        "reschedule_jobs",
    }
    assert {row[0] for row in node["sequences"]} == {
        "jobs_id_seq1",
        "job_queues_id_seq",
        "tasks_id_seq",
    }
    assert "jobs_pkey1" in {row[1] for row in node["constraints"]}
    assert {row[0] for row in node["indexes"]} >= {"jobs_main_index", "jobs_no_queue_index"}


def _state(engine: Engine, schema: str) -> dict[str, Any]:
    """The ledger and every function/relation row version of ``schema``."""
    q = quote(schema)
    with engine.connect() as conn:
        return {
            "ledger": conn.execute(
                text(f"select id, breaking, ts, xmin::text from {q}.migrations order by id")
            ).all(),
            "functions": conn.execute(
                text(
                    "select proname, oid::int8, xmin::text from pg_proc"
                    " where pronamespace = cast(:s as regnamespace) order by 1"
                ),
                {"s": q},
            ).all(),
            "relations": conn.execute(
                text(
                    "select relname, oid::int8, xmin::text from pg_class"
                    " where relnamespace = cast(:s as regnamespace) order by 1"
                ),
                {"s": q},
            ).all(),
        }


def test_node_starts_on_our_schema_and_applies_nothing(
    node_dir: Path,
    database_url: str,
    engine: Engine,
    schema: str,
    tmp_path: Path,
) -> None:
    q = quote(schema)
    with engine.begin() as conn:
        conn.execute(text(f"select {q}.add_job('noop', '{{\"from\": \"python\"}}')"))
    before = _state(engine, schema)

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"listen {quote(MIGRATE_CHANNEL)}")

        result = run_node(node_dir, database_url, schema, "--schema-only")
        assert result.returncode == 0, result.stdout + result.stderr
        assert _state(engine, schema) == before

        # A one-shot Node worker with one (no-op) task runs the job Python enqueued.
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "noop.js").write_text("module.exports = async () => {};\n")
        result = run_node(node_dir, database_url, schema, "--once", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "error" not in (result.stdout + result.stderr).lower()

        sentinel = f"sentinel-{secrets.token_hex(4)}"
        listener.execute("select pg_notify(%s, %s)", (MIGRATE_CHANNEL, sentinel))
        announced = []
        for notify in listener.notifies(timeout=30):
            if notify.payload == sentinel:
                break
            announced.append(notify.payload)
    assert announced == []

    after = _state(engine, schema)
    assert after["ledger"] == before["ledger"]
    assert after["functions"] == before["functions"]
    assert after["relations"] == before["relations"]
    with engine.connect() as conn:
        assert conn.scalar(text(f"select count(*) from {q}._private_jobs")) == 0
        assert conn.scalar(text(f"select count(*) from {q}.migrations")) == 20


# --- differential semantics of the SQL functions ------------------------------------------


@dataclass(frozen=True)
class Case:
    """A scripted scenario: ``setup`` statements, then one ``action`` whose outcome counts.

    Statements are templates: ``@S`` is the quoted worker schema.
    """

    name: str
    setup: tuple[str, ...]
    action: str


@dataclass
class Outcome:
    result: Any
    error: tuple[Any, ...] | None
    jobs: list[dict[str, Any]]
    queues: list[tuple[Any, ...]]
    tasks: list[str]
    notifications: list[Any]
    identities: dict[str, int]


def spec(
    identifier: str = "task_b",
    payload: str | None = '{"v": 2}',
    queue: str | None = "q2",
    run_at: str | None = "2033-01-01T00:00:00Z",
    max_attempts: int | None = 7,
    key: str | None = "k",
    priority: int | None = 4,
    flags: str | None = "array['f2']",
) -> str:
    def lit(value: Any) -> str:
        if value is None:
            return "null"
        return "'" + str(value).replace("'", "''") + "'"

    return (
        f"row({lit(identifier)}, {lit(payload)}::json, {lit(queue)},"
        f" {lit(run_at)}::timestamptz, {lit(max_attempts)}::smallint, {lit(key)},"
        f" {lit(priority)}::smallint, {flags or 'null'}::text[])::@S.job_spec"
    )


def add_job(key: str | None = "k", mode: str | None = None, **kw: str) -> str:
    identifier = kw.pop("identifier", "task_b")
    args = {
        "payload": "'{\"v\": 2}'",
        "queue_name": "'q2'",
        "run_at": "'2033-01-01T00:00:00Z'",
        "max_attempts": "7",
        "priority": "4",
        "flags": "array['f2']",
        **kw,
    }
    if key is not None:
        args["job_key"] = "'" + key + "'"
    if mode is not None:
        args["job_key_mode"] = mode
    named = ", ".join(f"{k} => {v}" for k, v in args.items())
    return f"select * from @S.add_job('{identifier}', {named})"


# Existing-job states, each made from one keyed job "k" in queue q1.
_EXISTING = (
    "select @S.add_job('task_a', '{\"v\": 1}', queue_name => 'q1',"
    " run_at => '2031-01-01T00:00:00Z', job_key => 'k', max_attempts => 5, priority => 3,"
    " flags => array['f1'])"
)
_LOCK = (
    "update @S._private_jobs set attempts = attempts + 1, locked_at = now() - interval '{age}',"
    " locked_by = '{by}' where key = '{key}'"
)
_LOCK_QUEUE = (
    "update @S._private_job_queues set locked_at = now() - interval '{age}', locked_by = '{by}'"
    " where queue_name = '{queue}'"
)
STATES: dict[str, tuple[str, ...]] = {
    "none": (),
    "waiting": (_EXISTING,),
    "retrying": (
        _EXISTING,
        "update @S._private_jobs set attempts = 2, last_error = 'boom',"
        " run_at = '2032-01-01T00:00:00Z' where key = 'k'",
    ),
    "locked": (
        _EXISTING,
        _LOCK.format(age="1 minute", by="pool-a", key="k"),
        _LOCK_QUEUE.format(age="1 minute", by="pool-a", queue="q1"),
    ),
    "stale_locked": (_EXISTING, _LOCK.format(age="5 hours", by="pool-old", key="k")),
    "permanently_failed": (
        _EXISTING,
        "update @S._private_jobs set attempts = max_attempts, last_error = 'dead' where key = 'k'",
    ),
}

# Jobs in every state, keyed ka..ke, for the admin functions.
_MIXED = (
    "select @S.add_job('task_a', job_key => 'ka', run_at => '2031-01-01T00:00:00Z')",
    "select @S.add_job('task_a', job_key => 'kb', queue_name => 'q1')",
    "select @S.add_job('task_a', job_key => 'kc', queue_name => 'q2')",
    "select @S.add_job('task_b', job_key => 'kd', max_attempts => 3)",
    "select @S.add_job('task_b', job_key => 'ke', run_at => '2032-01-01T00:00:00Z')",
    _LOCK.format(age="1 minute", by="pool-a", key="kb"),
    _LOCK_QUEUE.format(age="1 minute", by="pool-a", queue="q1"),
    _LOCK.format(age="4 hours 1 minute", by="pool-b", key="kc"),
    _LOCK_QUEUE.format(age="4 hours 1 minute", by="pool-b", queue="q2"),
    "update @S._private_jobs set attempts = 3, last_error = 'dead' where key = 'kd'",
    "update @S._private_jobs set attempts = 1, last_error = 'boom' where key = 'ke'",
)
_ALL_IDS = "array(select id from @S._private_jobs order by id)"

_MODES = {
    "default": None,
    "null": "null",
    "replace": "'replace'",
    "preserve_run_at": "'preserve_run_at'",
    "unsafe_dedupe": "'unsafe_dedupe'",
}


def _cases() -> list[Case]:
    cases = [
        Case(f"add_job-{mode}-{state}", setup, add_job(mode=literal))
        for mode, literal in _MODES.items()
        for state, setup in STATES.items()
    ]
    cases += [
        Case("add_job-defaults-only", (), "select * from @S.add_job('task_c')"),
        Case("add_job-no-key-bogus-mode", (), add_job(key=None, mode="'bogus'")),
        Case("add_job-bogus-mode", STATES["waiting"], add_job(mode="'bogus'")),
        Case("add_job-empty-flags", (), add_job(flags="'{}'::text[]")),
        Case(
            "add_job-null-identifier",
            (),
            "select * from @S.add_job(null, job_key => 'k')",
        ),
        Case(
            "add_job-unsafe-dedupe-null-identifier",
            (),
            "select * from @S.add_job(null, job_key => 'k', job_key_mode => 'unsafe_dedupe')",
        ),
        Case("add_job-identifier-128", (), f"select * from @S.add_job('{'i' * 128}')"),
        Case("add_job-identifier-129", (), f"select * from @S.add_job('{'i' * 129}')"),
        Case(
            "add_job-unsafe-dedupe-identifier-129",
            (),
            f"select * from @S.add_job('{'i' * 129}', job_key => 'k',"
            " job_key_mode => 'unsafe_dedupe')",
        ),
        Case("add_job-queue-129", (), add_job(queue_name=f"'{'q' * 129}'")),
        Case("add_job-key-empty", (), add_job(key="")),
        Case("add_job-key-512", (), add_job(key="k" * 512)),
        Case("add_job-key-513", (), add_job(key="k" * 513)),
        Case("add_job-unsafe-dedupe-key-empty", (), add_job(key="", mode="'unsafe_dedupe'")),
        Case("add_job-max-attempts-0", (), add_job(max_attempts="0")),
        Case("add_job-max-attempts-40000", (), add_job(max_attempts="40000")),
        Case("add_job-priority-40000", (), add_job(priority="40000")),
        Case("add_job-priority-negative", (), add_job(priority="-5")),
        Case(
            "add_job-unsafe-dedupe-priority-40000",
            (),
            add_job(priority="40000", mode="'unsafe_dedupe'"),
        ),
    ]
    # Array payloads concatenate on a keyed re-add (both arrays), else are replaced.
    for old, new in [("[1, 2]", "[3]"), ("[1]", '{"a": 1}'), ('{"a": 1}', "[2]"), ("[]", "[]")]:
        setup = (f"select @S.add_job('task_a', '{old}', job_key => 'arr')",)
        cases.append(
            Case(
                f"add_job-payload-{old}-then-{new}",
                setup,
                f"select * from @S.add_job('task_a', '{new}', job_key => 'arr')",
            )
        )
        cases.append(
            Case(
                f"add_jobs-payload-{old}-then-{new}",
                setup,
                "select * from @S.add_jobs(array["
                + spec("task_a", payload=new, key="arr", queue=None)
                + "])",
            )
        )
    cases.append(
        Case(
            "add_job-array-payload-on-locked-job",
            (
                "select @S.add_job('task_a', '[1, 2]', job_key => 'arr')",
                _LOCK.format(age="1 minute", by="pool-a", key="arr"),
            ),
            "select * from @S.add_job('task_a', '[3]', job_key => 'arr')",
        )
    )
    # add_jobs, with and without preserve_run_at, over waiting / retrying / locked / new keys.
    mixed_keys = (
        _EXISTING,
        _EXISTING.replace("'k'", "'k2'"),
        "update @S._private_jobs set attempts = 1, last_error = 'boom' where key = 'k2'",
        _EXISTING.replace("'k'", "'k3'"),
        _LOCK.format(age="1 minute", by="pool-a", key="k3"),
    )
    specs = ", ".join(spec(key=k) for k in ("k", "k2", "k3", "k4")) + ", " + spec(key=None)
    for preserve in ("true", "false", "null"):
        cases.append(
            Case(
                f"add_jobs-preserve-run-at-{preserve}",
                mixed_keys,
                f"select * from @S.add_jobs(array[{specs}], {preserve})",
            )
        )
    cases += [
        Case(
            "add_jobs-defaults",
            (),
            "select * from @S.add_jobs(array["
            + spec("task_c", None, None, None, None, None, None, None)
            + "])",
        ),
        Case("add_jobs-empty-array", (), "select * from @S.add_jobs('{}')"),
        Case("add_jobs-null-array", (), "select * from @S.add_jobs(null)"),
        Case(
            "add_jobs-duplicate-key",
            (),
            f"select * from @S.add_jobs(array[{spec(key='dup')}, {spec(key='dup')}])",
        ),
        Case(
            "add_jobs-identifier-129",
            (),
            f"select * from @S.add_jobs(array[{spec('i' * 129)}])",
        ),
        Case(
            "add_jobs-max-attempts-0",
            (),
            f"select * from @S.add_jobs(array[{spec(max_attempts=0)}])",
        ),
        Case(
            "add_jobs-existing-task-and-queue",
            (_EXISTING,),
            "select * from @S.add_jobs(array["
            + spec("task_a", queue="q1", key="kx")
            + ", "
            + spec("task_a", queue="q1", key=None)
            + "])",
        ),
    ]
    # remove_job
    for state in ("waiting", "locked", "stale_locked", "permanently_failed", "none"):
        cases.append(Case(f"remove_job-{state}", STATES[state], "select * from @S.remove_job('k')"))
    cases.append(Case("remove_job-null", STATES["waiting"], "select * from @S.remove_job(null)"))
    # The admin functions over jobs in every state (incl. locks older than 4 hours).
    cases += [
        Case("complete_jobs", _MIXED, f"select * from @S.complete_jobs({_ALL_IDS})"),
        Case("complete_jobs-none", _MIXED, "select * from @S.complete_jobs('{}')"),
        Case(
            "permanently_fail_jobs-message",
            _MIXED,
            f"select * from @S.permanently_fail_jobs({_ALL_IDS}, 'given up')",
        ),
        Case(
            "permanently_fail_jobs-default-message",
            _MIXED,
            f"select * from @S.permanently_fail_jobs({_ALL_IDS})",
        ),
        Case(
            "reschedule_jobs-everything",
            _MIXED,
            f"select * from @S.reschedule_jobs({_ALL_IDS}, run_at => '2034-01-01T00:00:00Z',"
            " priority => 9, attempts => 0, max_attempts => 30)",
        ),
        Case(
            "reschedule_jobs-nothing-given",
            _MIXED,
            f"select * from @S.reschedule_jobs({_ALL_IDS})",
        ),
        Case(
            "reschedule_jobs-attempts-40000",
            _MIXED,
            f"select * from @S.reschedule_jobs({_ALL_IDS}, attempts => 40000)",
        ),
        Case(
            "reschedule_jobs-max-attempts-0",
            _MIXED,
            f"select * from @S.reschedule_jobs({_ALL_IDS}, max_attempts => 0)",
        ),
        Case(
            "force_unlock_workers",
            _MIXED,
            "select @S.force_unlock_workers(array['pool-a', 'pool-x'])",
        ),
        Case(
            "force_unlock_workers-both",
            _MIXED,
            "select @S.force_unlock_workers(array['pool-a', 'pool-b'])",
        ),
    ]
    return cases


CASES = _cases()
_SEQUENCES = ("jobs_id_seq1", "job_queues_id_seq", "tasks_id_seq")
_TIMESTAMPS = ("run_at", "created_at", "updated_at", "locked_at")


class Runner:
    """Runs cases against one worker schema and reports normalised outcomes."""

    def __init__(self, database_url: str, schema: str) -> None:
        self.schema = schema
        self.quoted = quote(schema)
        self.conn = psycopg.connect(database_url, row_factory=dict_row)
        self.listener = psycopg.connect(database_url, autocommit=True)
        self.listener.execute(f"listen {quote(INSERT_CHANNEL)}")

    def close(self) -> None:
        self.conn.close()
        self.listener.close()

    def sql(self, template: str) -> str:
        return template.replace("@S", self.quoted)

    def identities(self) -> dict[str, int]:
        values = {}
        for seq in _SEQUENCES:
            row = self.conn.execute(
                f"select last_value, is_called from {self.quoted}.{seq}"
            ).fetchone()
            assert row is not None
            values[seq] = row["last_value"] if row["is_called"] else row["last_value"] - 1
        self.conn.commit()
        return values

    def notifications(self) -> list[Any]:
        sentinel = f"sentinel-{secrets.token_hex(4)}"
        self.listener.execute("select pg_notify(%s, %s)", (INSERT_CHANNEL, sentinel))
        received: list[Any] = []
        for notify in self.listener.notifies(timeout=30):
            if notify.payload == sentinel:
                return received
            received.append(notify.payload)
        raise AssertionError("the sentinel notification never came")

    def reset(self) -> None:
        with self.conn.transaction():
            for table in ("_private_jobs", "_private_job_queues", "_private_tasks"):
                self.conn.execute(f"delete from {self.quoted}.{table}")
        self.notifications()

    def run(self, case: Case) -> Outcome:
        self.reset()
        identities = self.identities()
        conn = self.conn
        with conn.transaction():
            for statement in case.setup:
                conn.execute(self.sql(statement))
            # Timestamps left by the setup are moved away from now(), so that the
            # action's writes to them can be seen.
            conn.execute(
                self.sql(
                    "update @S._private_jobs set created_at = '2001-01-01T00:00:00Z',"
                    " updated_at = '2001-02-01T00:00:00Z'"
                )
            )
            row = conn.execute("select now() as now").fetchone()
            assert row is not None
            now = row["now"]
            before_ids = [
                r["id"]
                for r in conn.execute(self.sql("select id from @S._private_jobs order by id"))
            ]
            error = None
            result: list[dict[str, Any]] = []
            try:
                with conn.transaction():
                    result = conn.execute(self.sql(case.action)).fetchall()
            except psycopg.Error as exc:
                error = (exc.sqlstate, exc.diag.constraint_name, exc.diag.message_primary)
            jobs = conn.execute(self.sql("select * from @S._private_jobs order by id")).fetchall()
            queues = conn.execute(
                self.sql(
                    "select id, queue_name, locked_at, locked_by, is_available"
                    " from @S._private_job_queues order by queue_name"
                )
            ).fetchall()
            tasks = conn.execute(
                self.sql("select id, identifier from @S._private_tasks order by identifier")
            ).fetchall()

        labels: dict[int, str] = {job_id: f"j{n}" for n, job_id in enumerate(before_ids)}
        new_ids = sorted(
            {r["id"] for r in [*result, *jobs] if r.get("id") is not None} - set(labels)
        )
        labels.update({job_id: f"new{n}" for n, job_id in enumerate(new_ids)})
        task_names = {t["id"]: t["identifier"] for t in tasks}
        queue_names = {q["id"]: q["queue_name"] for q in queues}

        def when(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value == now:
                return "now"
            if abs(value - now) < timedelta(days=1):
                return f"now{(value - now).total_seconds():+.0f}s"
            return value.isoformat()

        def job(row: dict[str, Any]) -> dict[str, Any]:
            out = dict(row)
            if "id" in out:
                out["id"] = labels.get(out["id"], out["id"])
            if "task_id" in out:
                out["task_id"] = task_names.get(out["task_id"], out["task_id"])
            if "job_queue_id" in out:
                out["job_queue_id"] = queue_names.get(out["job_queue_id"], out["job_queue_id"])
            if isinstance(out.get("payload"), (dict, list)):
                out["payload"] = json.dumps(out["payload"])
            for column in _TIMESTAMPS:
                if column in out:
                    out[column] = when(out[column])
            return out

        notifications = []
        for payload in self.notifications():
            try:
                message = json.loads(payload)
            except ValueError:
                notifications.append(payload)
                continue
            assert 0 <= float(message.pop("r")) < 1, payload
            notifications.append(message)
        after = self.identities()
        return Outcome(
            result=sorted((job(r) for r in result), key=repr),
            error=error,
            jobs=[job(r) for r in jobs],
            queues=[(q["queue_name"], when(q["locked_at"]), q["locked_by"]) for q in queues],
            tasks=[t["identifier"] for t in tasks],
            notifications=notifications,
            identities={seq: after[seq] - identities[seq] for seq in _SEQUENCES},
        )


@pytest.fixture(scope="module")
def runners(node_dir: Path, database_url: str, engine: Engine) -> Iterator[tuple[Runner, Runner]]:
    node_schema = f"gwnode_{secrets.token_hex(4)}"
    our_schema = f"gwours_{secrets.token_hex(4)}"
    node_migrate(node_dir, database_url, node_schema)
    migrate(engine, schema=our_schema)
    node, ours = Runner(database_url, node_schema), Runner(database_url, our_schema)
    try:
        yield node, ours
    finally:
        node.close()
        ours.close()
        drop_schema(engine, node_schema)
        drop_schema(engine, our_schema)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sql_functions_behave_like_nodes(runners: tuple[Runner, Runner], case: Case) -> None:
    node, ours = runners
    expected = node.run(case)
    actual = ours.run(case)
    assert actual.error == expected.error
    assert actual.result == expected.result
    assert actual.jobs == expected.jobs
    assert actual.queues == expected.queues
    assert actual.tasks == expected.tasks
    assert actual.notifications == expected.notifications
    assert actual.identities == expected.identities


def test_the_differential_scenarios_exercise_what_they_name(
    runners: tuple[Runner, Runner],
) -> None:
    """Spot checks on Node's own outcomes, so the scenarios cannot silently test nothing."""
    node, _ = runners
    by_name = {case.name: case for case in CASES}

    locked = node.run(by_name["add_job-replace-locked"])
    assert [j["key"] for j in locked.jobs] == [None, "k"]
    assert locked.jobs[0]["attempts"] == locked.jobs[0]["max_attempts"]
    assert locked.jobs[0]["locked_by"] == "pool-a"

    concatenated = node.run(by_name["add_job-payload-[1, 2]-then-[3]"])
    assert concatenated.jobs[0]["payload"] == "[1, 2, 3]"
    assert concatenated.jobs[0]["revision"] == 1

    preserved = node.run(by_name["add_jobs-preserve-run-at-true"])
    run_at = {j["key"]: j["run_at"] for j in preserved.jobs}
    assert run_at["k"] == "2031-01-01T00:00:00+00:00"
    assert run_at["k2"] == "2033-01-01T00:00:00+00:00"

    for name, state, constraint in [
        ("add_job-bogus-mode", "GWBKM", None),
        ("add_job-identifier-129", "23514", "tasks_identifier_check"),
        ("add_job-key-empty", "23514", "jobs_key_check"),
        ("add_job-key-513", "23514", "jobs_key_check"),
        ("add_job-max-attempts-0", "23514", "jobs_max_attempts_check"),
        ("add_job-priority-40000", "22003", None),
        ("add_jobs-duplicate-key", "21000", None),
    ]:
        error = node.run(by_name[name]).error
        assert error is not None and error[:2] == (state, constraint), name

    completed = node.run(by_name["complete_jobs"])
    assert [j["key"] for j in completed.jobs] == ["kb"]

    removed = node.run(by_name["remove_job-waiting"])
    assert removed.jobs == [] and removed.notifications[-1] == {"count": -1}
