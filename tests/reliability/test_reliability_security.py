"""Security: hostile names and values reach SQL only quoted or bound; secrets stay secret.

* A schema name, task identifier, queue name, job key and payload made of SQL (``";
  drop table …; --``, dollar quotes, ``%`` and ``:name`` placeholders) go through
  migrate, add, a worker run and the CLI, and the sentinel table survives every step.
* The CLI never prints the database password (typed, percent-encoded or decoded), in
  errors, ``--verbose`` tracebacks or ``--json`` output.
* A role that may read the worker schema but does not own it gets ``NotSchemaOwner``.
"""

from __future__ import annotations

import inspect
import json
import secrets
import textwrap
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from worker_fixtures import execute

from sqla_graphile import JobSpec, NotSchemaOwner, Worker, WorkerUtils, migrate, task
from sqla_graphile.cli import main
from sqla_graphile.schema import quote_schema


def _runner() -> CliRunner:
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    return CliRunner()


def cli(*args: str) -> Result:
    env = {"DATABASE_URL": None, "GRAPHILE_WORKER_SCHEMA": None}
    return _runner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def sentinel(engine: Engine) -> Iterator[str]:
    name = f"rel_sentinel_{secrets.token_hex(4)}"
    execute(engine, f'create table public."{name}" (x int)')
    execute(engine, f'insert into public."{name}" values (42)')
    yield name
    execute(engine, f'drop table if exists public."{name}"')


def _survives(engine: Engine, sentinel: str) -> None:
    assert execute(engine, f'select x from public."{sentinel}"') == [{"x": 42}]


def _hostile(sentinel: str) -> list[str]:
    return [
        f'"; drop table public.{sentinel}; --',
        f"$$; drop table public.{sentinel}; $$",
        f"%(x)s %s :name'); drop table public.{sentinel}; --",
    ]


@pytest.mark.parametrize("variant", range(3))
def test_hostile_names_and_values_never_reach_sql_as_code(
    engine: Engine,
    database_url: str,
    sentinel: str,
    variant: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evil = _hostile(sentinel)[variant]
    assert len(evil.encode()) <= 63
    try:
        # Library: migrate, add, read, run.
        migrate(engine, schema=evil)
        _survives(engine, sentinel)
        utils = WorkerUtils(engine, evil)
        payload = {evil: [evil, {"k": evil}]}
        job = utils.add_raw_job(evil, payload, JobSpec(queue_name=evil, job_key=evil))
        assert (job.task_identifier, job.queue_name, job.key) == (evil, evil, evil)
        stored = WorkerUtils(engine, evil).get_job(job.id)
        assert stored is not None and stored.payload == payload
        _survives(engine, sentinel)

        seen: list[Any] = []

        @task(evil)
        def handler(value: Any, ctx: Any) -> None:
            seen.append((value, ctx.job.queue_name, ctx.job.key))

        worker = Worker(engine, [handler], schema=evil, concurrency=2)
        worker.run_once()
        worker.close()
        assert seen == [(payload, evil, evil)]
        assert utils.list_jobs() == []
        _survives(engine, sentinel)

        # CLI: the same values as command-line arguments.
        base = ["--database-url", database_url, "--schema", evil, "--json"]
        assert cli(*base, "migrate").exit_code == 0
        added = cli(
            *base, "add", evil, "--payload", json.dumps(payload), "--queue", evil, "--key", evil
        )
        assert added.exit_code == 0, added.stderr
        job_id = json.loads(added.stdout)["id"]
        listed = cli(*base, "list", "--task", evil, "--queue", evil)
        assert listed.exit_code == 0 and [j["id"] for j in json.loads(listed.stdout)] == [job_id]
        shown = cli(*base, "show", str(job_id))
        assert shown.exit_code == 0 and json.loads(shown.stdout)["payload"] == payload
        _survives(engine, sentinel)
        module = f"rel_evil_tasks_{secrets.token_hex(4)}"
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(
                f"""
                from sqla_graphile import task

                @task({evil!r})
                def evil(payload, ctx):
                    pass
                """
            )
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        ran = cli(*base, "run", "--once", "--tasks", module)
        assert ran.exit_code == 0, ran.stderr
        assert json.loads(ran.stdout.splitlines()[-1])["completed"] == 1
        assert cli(*base, "add", evil, "--key", evil).exit_code == 0
        assert cli(*base, "remove", evil).exit_code == 0
        assert cli(*base, "cleanup").exit_code == 0
        assert cli(*base, "stats").exit_code == 0
        assert WorkerUtils(engine, evil).list_jobs() == []
        _survives(engine, sentinel)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                f"drop schema if exists {quote_schema(evil).replace('%', '%%')} cascade"
            )
            connection.commit()
    _survives(engine, sentinel)


@pytest.fixture
def task_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module with one task, for ``run --tasks``."""
    module = f"rel_tasks_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(
        "from sqla_graphile import task\n\n@task('t')\ndef t(payload, ctx):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


PASSWORD = "S3cr:t/p@ss%41é w0rd"


def _url_with_password(database_url: str, user: str) -> str:
    url = make_url(database_url)
    encoded = urllib.parse.quote(PASSWORD, safe="")
    return f"postgresql://{user}:{encoded}@{url.host}:{url.port}/{url.database}"


def _secret_forms() -> set[str]:
    # The password as typed in the URL, decoded, and in other encodings, and pieces of it.
    return {
        PASSWORD,
        urllib.parse.quote(PASSWORD, safe=""),
        urllib.parse.quote(PASSWORD),
        urllib.parse.quote_plus(PASSWORD),
        make_url(f"postgresql://u:{urllib.parse.quote(PASSWORD, safe='')}@h/d")
        .render_as_string(hide_password=False)
        .split(":", 2)[2]
        .rsplit("@", 1)[0],
        "p@ss%41",
        "S3cr%3At",
        "S3cr:t",
    }


@pytest.mark.parametrize(
    "command",
    [
        ["migrate"],
        ["add", "t", "--payload", "{}"],
        ["list"],
        ["stats"],
        ["run", "--once", "--tasks", "{tasks}"],
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("flags", [[], ["--verbose"], ["--json"], ["--verbose", "--json"]])
def test_cli_never_prints_the_password(
    database_url: str, command: list[str], flags: list[str], task_module: str
) -> None:
    command = [task_module if arg == "{tasks}" else arg for arg in command]
    # The server trusts local connections: an unknown role is what makes them fail.
    url = _url_with_password(database_url, f"no_such_role_{secrets.token_hex(3)}")
    assert urllib.parse.quote(PASSWORD, safe="") in url
    result = cli("--database-url", url, *flags, *command)
    assert result.exit_code != 0
    output = result.stdout + result.stderr
    assert "error" in output.lower()
    for form in _secret_forms():
        assert form not in output, f"{form!r} printed by {command} {flags}:\n{output}"


def test_cli_errors_after_connecting_never_print_the_password(
    engine: Engine, database_url: str, login_role: tuple[str, str], schema: str
) -> None:
    role, _ = login_role
    url = _url_with_password(database_url, role)
    for flags in ([], ["--verbose"], ["--json"]):
        for command in (["list"], ["add", "t"], ["migrate"]):
            result = cli("--database-url", url, "--schema", schema, *flags, *command)
            assert result.exit_code == 1
            output = result.stdout + result.stderr
            for form in _secret_forms():
                assert form not in output, output


@pytest.fixture
def reader_role(engine: Engine, schema: str, login_role: tuple[str, str]) -> str:
    """A LOGIN role that may read and call the worker schema, but does not own it."""
    role, url = login_role
    s = quote_schema(schema)
    for grant in (
        f'grant usage on schema {s} to "{role}"',
        f'grant execute on all functions in schema {s} to "{role}"',
        f'grant select on all tables in schema {s} to "{role}"',
    ):
        execute(engine, grant)
    return url


def test_a_role_that_does_not_own_the_schema_gets_not_schema_owner(
    engine: Engine, schema: str, reader_role: str
) -> None:
    utils = WorkerUtils(reader_role, schema)
    try:
        with pytest.raises(NotSchemaOwner, match="owns it"):
            utils.add_raw_job("t", {})
    finally:
        utils.close()

    @task("t")
    def handler(payload: Any, ctx: Any) -> None:
        raise AssertionError("no job may run")

    worker = Worker(reader_role, [handler], schema=schema)
    try:
        with pytest.raises(NotSchemaOwner, match="owns it"):
            worker.run_once()
    finally:
        worker.close()
    # The owner sees nothing was written.
    assert WorkerUtils(engine, schema).list_jobs() == []


def test_cli_reports_not_schema_owner(schema: str, reader_role: str) -> None:
    result = cli("--database-url", reader_role, "--schema", schema, "add", "t")
    assert result.exit_code == 1
    assert "permission denied on the worker schema" in result.stderr
