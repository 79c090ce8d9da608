"""The rules of "Exit status and errors" (docs/cli.md), one test (or more) per rule.

Every run goes to a real PostgreSQL (or to a closed port of the loopback interface when
the rule is about an unreachable database), through ``click.testing.CliRunner`` or the
real entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from test_cli import (
    Cli,
    add,
    invoke,
    job_row,
    json_error,
    lock,
    runtime_error,
    sql,
    usage_error,
)

from sqla_graphile import WorkerUtils
from sqla_graphile._urls import redact_url, url_secrets
from sqla_graphile.cli import main
from sqla_graphile.schema import quote_schema

FAR_FUTURE = "2999-01-01T00:00:00Z"
SECRET = "S3cret-Pw"


@pytest.fixture
def cli(database_url: str, schema: str) -> Cli:
    return Cli(database_url, schema)


# -- passwords are never printed ---------------------------------------------------------

# Each form a password can take in a URL; port 1 of the loopback interface is closed.
SECRET_URLS = {
    "userinfo": f"postgresql://operator:{SECRET}@127.0.0.1:1/jobs",
    "query": f"postgresql://operator@127.0.0.1:1/jobs?password={SECRET}",
    "query-encoded": "postgresql://operator@127.0.0.1:1/jobs?password=S%33cret-Pw",
    "sslpassword": f"postgresql://operator@127.0.0.1:1/jobs?sslpassword={SECRET}&sslmode=prefer",
    "both": f"postgres://operator:{SECRET}x@127.0.0.1:1/jobs?password={SECRET}",
}
MODES = {"plain": [], "verbose": ["-v"], "json": ["--json"], "json-verbose": ["--json", "-v"]}


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("form", SECRET_URLS, ids=str)
def test_no_password_form_is_printed_on_a_connection_error(form: str, mode: str) -> None:
    result = invoke(["--database-url", SECRET_URLS[form], *MODES[mode], "stats"])
    assert result.exit_code == 1
    printed = result.stdout + result.stderr
    assert "S3cret" not in printed and "S%33cret" not in printed
    assert "***" in printed  # the URL is shown, its secret masked
    if "verbose" in mode:
        assert "Traceback (most recent call last)" in printed


def test_no_password_is_printed_by_a_reachable_database(
    database_url: str, schema_name: str
) -> None:
    # The server (trust authentication) ignores the password: statements do run.
    url = make_url(database_url).update_query_dict({"password": SECRET})
    with_secret = url.render_as_string(hide_password=False)
    assert SECRET in with_secret
    for args in (["-v", "stats"], ["--json", "-v", "stats"], ["show", "1"]):
        result = invoke(["--database-url", with_secret, "--schema", schema_name, *args])
        assert result.exit_code == 1
        assert "schema not migrated" in result.stderr
        assert SECRET not in result.stdout + result.stderr


def test_redacted_url_and_secrets() -> None:
    url = "postgresql://u:p%40ss@h/db?sslpassword=x%2Fy&passfile=/home/u/.pgpass&sslmode=require"
    shown = redact_url(url)
    assert shown == (
        "postgresql+psycopg://u:***@h/db?passfile=%2Fhome%2Fu%2F.pgpass&sslmode=require"
        "&sslpassword=***"
    )
    secrets = url_secrets(url)
    assert {"p@ss", "p%40ss", "x/y", "x%2Fy"} <= secrets
    assert "require" not in secrets and "/home/u/.pgpass" not in secrets
    # An unparsable URL is not echoed at all, but its password is still known.
    assert redact_url("postgresql://u:hidden@h:notaport/db") == "<unparsable database URL>"
    assert "hidden" in url_secrets("postgresql://u:hidden@h:notaport/db")


# -- a job or worker that does not exist -------------------------------------------------


@pytest.mark.parametrize(
    ("command", "extra"),
    [("complete", []), ("fail", ["--reason", "x"]), ("reschedule", ["--priority", "5"])],
)
def test_a_missing_job_id_fails_and_changes_nothing(
    cli: Cli, engine: Engine, schema: str, command: str, extra: list[str]
) -> None:
    job_id = add(cli, "t")
    before = job_row(engine, schema, job_id)
    line = runtime_error(
        cli(command, str(job_id), "999999", "999998", *extra),
        "no jobs with ids 999999, 999998; nothing was changed",
    )
    assert str(job_id) not in line
    assert job_row(engine, schema, job_id) == before  # the existing job was left alone
    data = json_error(cli(command, "999999", *extra, as_json=True), "not_found", "999999")
    assert data["missing"] == [999999]
    assert job_row(engine, schema, job_id) == before


def test_a_locked_job_is_skipped_not_missing(cli: Cli, engine: Engine, schema: str) -> None:
    free, held = add(cli, "t"), add(cli, "t")
    lock(engine, schema, held, "w")
    assert cli.json("reschedule", str(free), str(held), "--priority", "4") == {
        "rescheduled": [free],
        "skipped": [held],
    }
    row = job_row(engine, schema, free)
    assert row is not None and row["priority"] == 4


def test_a_missing_key_fails(cli: Cli) -> None:
    runtime_error(cli("remove", "nokey"), "no job with key 'nokey'")
    data = json_error(cli("remove", "nokey", as_json=True), "not_found", "nokey")
    assert data["missing"] == ["nokey"]


def test_force_unlock_of_a_worker_without_locks_releases_none(
    cli: Cli, engine: Engine, schema: str
) -> None:
    runtime_error(
        cli("force-unlock", "never-seen"), "worker id 'never-seen' holds no lock", "nothing"
    )
    job_id = add(cli, "t")
    lock(engine, schema, job_id, "dead")
    # One known holder and one unknown: nothing is released.
    data = json_error(
        cli("force-unlock", "dead", "never-seen", as_json=True), "not_found", "never-seen"
    )
    assert data["missing"] == ["never-seen"]
    row = job_row(engine, schema, job_id)
    assert row is not None and row["locked_by"] == "dead"
    assert cli.ok("force-unlock", "dead").strip() == (
        "Released 1 job lock(s) and 0 queue lock(s) of 1 worker id(s)."
    )
    row = job_row(engine, schema, job_id)
    assert row is not None and row["locked_by"] is None


# -- reschedule: --now, --run-at, or the run time kept -----------------------------------


def test_reschedule_keeps_the_run_time_unless_told(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "t", "--run-at", FAR_FUTURE)
    before = job_row(engine, schema, job_id)
    assert before is not None
    assert cli.json("reschedule", str(job_id), "--priority", "3")["rescheduled"] == [job_id]
    after = job_row(engine, schema, job_id)
    assert after is not None
    assert (after["run_at"], after["priority"]) == (before["run_at"], 3)


def test_reschedule_now_uses_the_databases_clock(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "t", "--run-at", FAR_FUTURE)
    cli.ok("reschedule", str(job_id), "--now")
    # now() is the start of the reading transaction: the job's run_at is not after it.
    rows = sql(
        engine,
        "select run_at <= now() as due, now() - run_at as age from {s}._private_jobs "
        "where id = :id",
        schema,
        id=job_id,
    )
    assert rows[0]["due"] is True
    assert rows[0]["age"] < timedelta(hours=1)


def test_reschedule_with_nothing_to_change_is_a_usage_error(
    cli: Cli, engine: Engine, schema: str
) -> None:
    job_id = add(cli, "t", "--run-at", FAR_FUTURE)
    usage_error(cli("reschedule", str(job_id)), "nothing to change", "--now")
    row = job_row(engine, schema, job_id)
    assert row is not None and row["due"] is False


# -- migrate reports what it applied -----------------------------------------------------


def test_migrate_reports_what_it_applied(
    engine: Engine, database_url: str, schema_name: str
) -> None:
    cli = Cli(database_url, schema_name)
    first = cli.json("migrate")
    assert first == {
        "schema": schema_name,
        "migrated": True,
        "from_migration": None,
        "to_migration": 20,
        "revisions_applied": ["graphile_worker_0001", "graphile_worker_0002"],
    }
    # A schema left at this library's first revision: only the second is applied.
    sql(engine, "drop table {s}._sqla_graphile_workers", schema_name)
    sql(engine, "update {s}.alembic_version set version_num = 'graphile_worker_0001'", schema_name)
    out = cli.ok("migrate").strip()
    assert out == (
        f"Migrated schema {schema_name!r}: Graphile Worker migration 20 -> 20; "
        "revisions applied: graphile_worker_0002."
    )
    assert cli.json("migrate")["migrated"] is False


# -- usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["add", ""],
        ["add", "t", "--queue", ""],
        ["add", "t", "--key", ""],
        ["add", "t", "--flag", ""],
        ["list", "--queue", ""],
        ["remove", ""],
        ["force-unlock", ""],
    ],
    ids=lambda args: "-".join(a or "EMPTY" for a in args),
)
def test_an_empty_name_is_a_usage_error(
    cli: Cli, engine: Engine, schema: str, args: list[str]
) -> None:
    usage_error(cli(*args), "must not be empty")
    json_error(cli(*args, as_json=True), "usage", "must not be empty", exit_code=2)
    assert sql(engine, "select count(*) as n from {s}._private_jobs", schema) == [{"n": 0}]


@pytest.mark.parametrize(
    "args",
    [["show", "0"], ["complete", "99999999999999999999"], ["reschedule", "0", "--now"]],
    ids=lambda args: "-".join(args),
)
def test_a_job_id_that_cannot_exist_is_a_usage_error(cli: Cli, args: list[str]) -> None:
    # Not a runtime error about a smallint (the database's word for a bigint overflow).
    usage_error(cli(*args), "is not in the range 1<=x<=9223372036854775807")


@pytest.mark.parametrize(
    "args",
    [
        ["sweep-stale-workers", "--sweep-threshold", "0"],
        ["run", "--tasks", "m", "--poll-interval", "0s"],
        ["run", "--tasks", "m", "--statement-timeout", "0"],
        ["demo", "--timeout", "0ms"],
    ],
    ids=lambda args: args[0] + args[-2],
)
def test_a_zero_duration_where_one_is_needed_is_a_usage_error(cli: Cli, args: list[str]) -> None:
    # Caught here, before the library would refuse it with a ValueError.
    usage_error(cli(*args), "must be longer than 0")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:pw@localhost/db",
        "postgresql+asyncpg://postgres@127.0.0.1/postgres",
        "sqlite://",
    ],
)
def test_an_unsupported_url_is_a_usage_error_naming_the_supported_ones(url: str) -> None:
    result = invoke(["--database-url", url, "stats"])
    usage_error(result, "is not supported", "postgresql://", "postgres://", "postgresql+psycopg://")
    assert "Traceback" not in result.stderr and "ModuleNotFound" not in result.stderr
    assert "pw@" not in result.stderr


def test_every_supported_url_scheme_works(cli: Cli, database_url: str) -> None:
    job_id = add(cli, "t")
    rest = database_url.partition("://")[2]
    for scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        shown = Cli(f"{scheme}://{rest}", cli.schema).json("show", str(job_id))
        assert shown["id"] == job_id


def test_json_usage_errors_before_and_after_the_command_name(cli: Cli) -> None:
    json_error(cli("show", "abc", as_json=True), "usage", "JOB_ID", exit_code=2)
    result = invoke(["--database-url", cli.url, "show", "abc", "--json"])
    json_error(result, "usage", "JOB_ID", exit_code=2)
    json_error(invoke(["--json", "--schema"]), "usage", "--schema", exit_code=2)
    json_error(invoke(["--json", "no-such-command"]), "usage", "no-such-command", exit_code=2)


# -- internal errors ---------------------------------------------------------------------


@pytest.fixture
def buggy_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """A programming error where ``stats`` runs: it reads the database, then trips."""
    real = WorkerUtils.stats

    def stats(self: WorkerUtils) -> Any:
        result = real(self)
        return result.ready + "jobs"  # a TypeError, as from a bug

    monkeypatch.setattr(WorkerUtils, "stats", stats)


def test_an_internal_error_shows_its_traceback(cli: Cli, buggy_stats: None) -> None:
    result = cli("stats")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Traceback (most recent call last)" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("internal error: TypeError: unsupported operand"), last
    data = json_error(cli("stats", as_json=True), "internal", "TypeError")
    assert data["exception"] == "TypeError"
    assert "Traceback (most recent call last)" in data["traceback"]


def test_a_library_error_is_one_line_and_verbose_adds_its_traceback(
    cli: Cli, database_url: str
) -> None:
    runtime_error(cli("add", "x" * 200), "task identifiers are at most 128 characters")
    verbose = invoke(
        ["--database-url", database_url, "--schema", cli.schema, "-v", "add", "x" * 200]
    )
    assert verbose.exit_code == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith("error: task identifiers are at most")
    data = json_error(cli("add", "x" * 200, as_json=True), "error", "at most 128")
    assert data["exception"] == "TaskIdentifierTooLong" and "traceback" not in data


def test_a_database_error_is_one_line(cli: Cli, engine: Engine, schema: str) -> None:
    # A statement the server refuses (a lock timeout on a held row): reachable, so not
    # a connection error.
    job_id = add(cli, "t")
    url = make_url(cli.url).update_query_dict({"options": "-c lock_timeout=50"})
    impatient = Cli(url.render_as_string(hide_password=False), cli.schema)
    with engine.connect() as connection, connection.begin():
        connection.execute(
            text(f"select 1 from {quote_schema(schema)}._private_jobs where id = :id for update"),
            {"id": job_id},
        )
        runtime_error(impatient("fail", str(job_id)), "database error", "lock timeout")
        json_error(impatient("fail", str(job_id), as_json=True), "database", "lock timeout")


def test_a_connection_error_in_json(unreachable: str) -> None:
    data = json_error(invoke(["--database-url", unreachable, "--json", "list"]), "connection")
    assert data["error"].startswith("cannot reach the database at postgresql+psycopg://")


@pytest.fixture
def unreachable() -> str:
    return "postgresql://operator@127.0.0.1:1/jobs"


# -- add --payload-file - ----------------------------------------------------------------


def test_add_reads_the_payload_from_stdin(cli: Cli, engine: Engine, schema: str) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--database-url",
            cli.url,
            "--schema",
            schema,
            "--json",
            "add",
            "t",
            "--payload-file",
            "-",
        ],
        input='{"from": "stdin", "n": [1, 2]}',
        env={"DATABASE_URL": None},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["id"]
    row = job_row(engine, schema, job_id)
    assert row is not None and row["payload"] == {"from": "stdin", "n": [1, 2]}
    bad = CliRunner().invoke(
        main,
        ["--database-url", cli.url, "--schema", schema, "add", "t", "--payload-file", "-"],
        input="{not json",
        catch_exceptions=False,
    )
    assert bad.exit_code == 2 and "not valid JSON" in bad.stderr


# -- the real entry point ----------------------------------------------------------------


def test_exit_statuses_of_the_entry_point(database_url: str, schema: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sqla_graphile", "--database-url", database_url]
        return subprocess.run(
            [*argv, "--schema", schema, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = run("--json", "complete", "999999")
    assert missing.returncode == 1 and missing.stdout == ""
    assert json.loads(missing.stderr)["type"] == "not_found"
    assert run("add", "").returncode == 2
    assert run("reschedule", "1").returncode == 2


# -- the remaining cases of the table ----------------------------------------------------


def test_a_breaking_migration_newer_than_the_library_exits_57(
    cli: Cli, engine: Engine, schema: str
) -> None:
    sql(engine, "insert into {s}.migrations (id, breaking) values (21, true)", schema)
    result = cli("migrate")
    assert result.exit_code == 57
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "breaking migration 21" in result.stderr
    data = json_error(cli("migrate", as_json=True), "error", "upgrade sqla-graphile", exit_code=57)
    assert data["exception"] == "DatabaseNewerThanLibrary"


def _entry_point(database_url: str, schema: str, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "sqla_graphile", "--database-url", database_url]
    return [*argv, "--schema", schema, *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}


def test_an_interrupted_command_aborts_with_status_1(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "t")
    with engine.connect() as connection, connection.begin():
        # The row is held, so `fail` waits on it until interrupted.
        connection.execute(
            text(f"select 1 from {quote_schema(schema)}._private_jobs where id = :id for update"),
            {"id": job_id},
        )
        process = subprocess.Popen(
            _entry_point(cli.url, schema, "fail", str(job_id)),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As from a terminal: a suite started in the background (``cmd &``) passes an
            # ignored SIGINT on, and Python then keeps it ignored.
            preexec_fn=_default_sigint,
        )
        try:
            deadline = time.monotonic() + 60
            holder = connection.scalar(text("select pg_backend_pid()"))
            while not _waiting_on_a_lock(engine, holder):
                assert time.monotonic() < deadline, "the command never reached the lock"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 1
    assert stdout == ""
    assert stderr.strip().splitlines()[-1] == "Aborted!"
    row = job_row(engine, schema, job_id)
    assert row is not None and row["attempts"] == 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _waiting_on_a_lock(engine: Engine, holder: int) -> bool:
    """Whether a session waits on a lock that the session ``holder`` holds.

    Only the command's session can: any other session of the suite waiting on some lock
    must not let the test interrupt the command before it reached the row.
    """
    with engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "select count(*) from pg_stat_activity"
                    " where cast(:holder as integer) = any(pg_blocking_pids(pid))"
                ),
                {"holder": holder},
            )
        )


def test_a_closed_output_pipe_ends_quietly(cli: Cli, schema: str) -> None:
    add(cli, "t")
    process = subprocess.Popen(
        _entry_point(cli.url, schema, "list"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes anything
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 1
    assert stderr == ""  # no traceback, no error line: the reader left
