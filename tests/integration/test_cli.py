"""The ``graphile-worker`` command line, against a real PostgreSQL.

Every command runs in both output modes: the human tables are parsed by their header
columns (so a misaligned table fails), the ``--json`` output is parsed and checked against
the database. Most runs go through ``click.testing.CliRunner``; a few run the real entry
points (``python -m sqla_graphile`` and the ``graphile-worker`` console script) in a
subprocess to prove their exit statuses.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from sqla_graphile.cli import main, parse_duration, parse_time
from sqla_graphile.schema import quote_schema

FAR_FUTURE = "2999-01-01T00:00:00Z"

# -- running the command ----------------------------------------------------------------


def _runner() -> CliRunner:
    # click < 8.2 mixes stderr into stdout unless told not to; later versions keep them
    # apart and no longer know the argument.
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    return CliRunner()


# The environment of every run: no database or schema inherited from the test process.
CLEAN_ENV: dict[str, str | None] = {"DATABASE_URL": None, "GRAPHILE_WORKER_SCHEMA": None}


def invoke(args: Sequence[str], env: dict[str, str | None] | None = None) -> Result:
    return _runner().invoke(
        main, list(args), env={**CLEAN_ENV, **(env or {})}, catch_exceptions=False
    )


class Cli:
    """Runs commands against one database URL and worker schema."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema

    def __call__(self, *args: str, as_json: bool = False) -> Result:
        options = ["--database-url", self.url, "--schema", self.schema]
        return invoke([*options, *(["--json"] if as_json else []), *args])

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result.stdout

    def json(self, *args: str) -> Any:
        result = self(*args, as_json=True)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def cli(database_url: str, schema: str) -> Cli:
    return Cli(database_url, schema)


def usage_error(result: Result, *fragments: str) -> None:
    """Exit status 2, click's usage message on stderr naming ``fragments``, no stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def runtime_error(result: Result, *fragments: str) -> str:
    """Exit status 1 and exactly one line on stderr, ``error: ...``, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def json_error(result: Result, kind: str, *fragments: str, exit_code: int = 1) -> dict[str, Any]:
    """With --json: the exit status unchanged, one JSON object on stderr, no stdout."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    data: dict[str, Any] = json.loads(lines[0])
    assert data["type"] == kind, data
    for fragment in fragments:
        assert fragment in data["error"], data
    return data


def parse_table(block: str, headers: Sequence[str]) -> list[dict[str, str]]:
    """Read an aligned table: every cell starts under its header, after a space."""
    header, *lines = block.splitlines()
    assert header.split() == " ".join(headers).split(), header
    starts: list[int] = []
    for name in headers:
        starts.append(header.index(name, starts[-1] + 1 if starts else 0))
    rows = []
    for line in lines:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(line)
            assert start == 0 or line[start - 1] == " ", (line, headers[i])
            cell = line[start:end].strip()
            assert cell, (line, headers[i])
            cells.append(cell)
        rows.append(dict(zip(headers, cells, strict=True)))
    return rows


JOB_COLUMNS = [
    "ID",
    "TASK",
    "QUEUE",
    "STATE",
    "PRIORITY",
    "RUN AT",
    "ATTEMPTS",
    "KEY",
    "LOCKED BY",
    "LAST ERROR",
]


# -- the database, seen directly --------------------------------------------------------


def sql(engine: Engine, statement: str, schema: str, **params: Any) -> list[dict[str, Any]]:
    with engine.begin() as connection:
        result = connection.execute(text(statement.replace("{s}", quote_schema(schema))), params)
        return [dict(row) for row in result.mappings()] if result.returns_rows else []


def job_row(engine: Engine, schema: str, job_id: int) -> dict[str, Any] | None:
    rows = sql(
        engine,
        "select j.*, t.identifier as task_identifier, q.queue_name, j.run_at <= now() as due "
        "from {s}._private_jobs j join {s}._private_tasks t on t.id = j.task_id "
        "left join {s}._private_job_queues q on q.id = j.job_queue_id where j.id = :id",
        schema,
        id=job_id,
    )
    return rows[0] if rows else None


def lock(engine: Engine, schema: str, job_id: int, worker: str, age: str = "0 seconds") -> None:
    sql(
        engine,
        "update {s}._private_jobs set locked_by = :w, locked_at = now() - cast(:age as interval),"
        " attempts = attempts + 1 where id = :id",
        schema,
        w=worker,
        age=age,
        id=job_id,
    )


def register_worker(engine: Engine, schema: str, worker: str, age: str, **metadata: Any) -> None:
    sql(
        engine,
        "insert into {s}._sqla_graphile_workers (worker_id, started_at, last_heartbeat_at,"
        " metadata) values (:w, now() - cast(:age as interval) - interval '1 minute',"
        " now() - cast(:age as interval), cast(:meta as jsonb))",
        schema,
        w=worker,
        age=age,
        meta=json.dumps(metadata) if metadata else None,
    )


def add(cli: Cli, identifier: str, *options: str) -> int:
    return int(cli.json("add", identifier, *options)["id"])


# -- durations and times ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text_", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("90", timedelta(seconds=90)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
    ],
)
def test_parse_duration(text_: str, expected: timedelta) -> None:
    assert parse_duration(text_) == expected


@pytest.mark.parametrize("text_", ["", "5x", "m5", "-5s", "1h 30m", "five minutes", "1.2.3s"])
def test_parse_duration_rejects(text_: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text_)


def test_parse_time_now_is_the_current_utc_time() -> None:
    before = datetime.now(timezone.utc)
    parsed = parse_time("now")
    after = datetime.now(timezone.utc)
    assert parsed.tzinfo is not None
    assert before <= parsed <= after
    assert parse_time("NOW").tzinfo is not None


@pytest.mark.parametrize(
    "text_",
    ["2026-01-02T03:04:05Z", "2026-01-02T05:04:05+02:00", "2026-01-01T22:04:05-05:00"],
)
def test_parse_time_rfc3339_with_offsets(text_: str) -> None:
    parsed = parse_time(text_)
    assert parsed.tzinfo is not None
    assert parsed == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_parse_time_keeps_fractions() -> None:
    assert parse_time("2026-01-02T03:04:05.250Z") == datetime(
        2026, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc
    )


def test_parse_time_rejects_naive_times() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        parse_time("2026-01-02T03:04:05")


@pytest.mark.parametrize("text_", ["tomorrow", "2026-13-01T00:00:00Z", ""])
def test_parse_time_rejects_non_times(text_: str) -> None:
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        parse_time(text_)


# -- migrate ----------------------------------------------------------------------------


def test_migrate_creates_the_schema_then_reports_in_json(
    engine: Engine, database_url: str, schema_name: str
) -> None:
    cli = Cli(database_url, schema_name)
    out = cli.ok("migrate")
    assert out.strip() == (
        f"Migrated schema {schema_name!r}: Graphile Worker migration none -> 20; "
        "revisions applied: graphile_worker_0001, graphile_worker_0002."
    )
    ledger = sql(engine, "select max(id) as top, count(*) as n from {s}.migrations", schema_name)
    assert ledger == [{"top": 20, "n": 20}]
    assert cli.json("migrate") == {
        "schema": schema_name,
        "migrated": False,
        "from_migration": 20,
        "to_migration": 20,
        "revisions_applied": [],
    }
    assert cli.ok("migrate").strip() == (
        f"Schema {schema_name!r} is up to date (Graphile Worker migration 20); nothing to apply."
    )
    assert sql(engine, "select count(*) as n from {s}.migrations", schema_name) == [{"n": 20}]


def test_migrate_reads_the_schema_from_the_environment(
    engine: Engine, database_url: str, schema_name: str
) -> None:
    result = invoke(
        ["--json", "migrate"],
        env={"DATABASE_URL": database_url, "GRAPHILE_WORKER_SCHEMA": schema_name},
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "schema": schema_name,
        "migrated": True,
        "from_migration": None,
        "to_migration": 20,
        "revisions_applied": ["graphile_worker_0001", "graphile_worker_0002"],
    }
    assert sql(engine, "select count(*) as n from {s}.migrations", schema_name) == [{"n": 20}]


# -- add --------------------------------------------------------------------------------


def test_add_human(cli: Cli, engine: Engine, schema: str) -> None:
    out = cli.ok(
        "add",
        "send_email",
        "--payload",
        '{"to": "user@example.com"}',
        "--queue",
        "emails",
        "--run-at",
        "2999-01-02T05:04:05+02:00",
        "--max-attempts",
        "3",
        "--key",
        "welcome-1",
        "--priority",
        "-5",
        "--flag",
        "slow",
        "--flag",
        "billing",
    )
    (row,) = sql(engine, "select id from {s}._private_jobs", schema)
    assert out.strip() == f"Added job {row['id']} (send_email), runs at 2999-01-02 03:04:05Z."
    job = job_row(engine, schema, row["id"])
    assert job is not None
    assert job["task_identifier"] == "send_email"
    assert job["payload"] == {"to": "user@example.com"}
    assert job["queue_name"] == "emails"
    assert job["run_at"] == datetime(2999, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert (job["max_attempts"], job["key"], job["priority"]) == (3, "welcome-1", -5)
    assert set(job["flags"]) == {"slow", "billing"}


def test_add_json_matches_the_database(cli: Cli, engine: Engine, schema: str) -> None:
    data = cli.json("add", "resize", "--payload", '[1, {"w": 2}]', "--flag", "f")
    job = job_row(engine, schema, data["id"])
    assert job is not None
    assert data["task_identifier"] == job["task_identifier"] == "resize"
    assert data["payload"] == job["payload"] == [1, {"w": 2}]
    assert data["queue_name"] is None and job["queue_name"] is None
    assert datetime.fromisoformat(data["run_at"]) == job["run_at"]
    assert (data["attempts"], data["max_attempts"], data["priority"]) == (0, 25, 0)
    assert data["flags"] == ["f"]
    assert data["locked_by"] is None and data["key"] is None


def test_add_defaults_to_an_empty_object_payload(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "noop")
    job = job_row(engine, schema, job_id)
    assert job is not None and job["payload"] == {}
    assert job["due"] is True


def test_add_payload_file(cli: Cli, engine: Engine, schema: str, tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text('{"report": "monthly", "ids": [1, 2, 3]}', encoding="utf-8")
    data = cli.json("add", "report", "--payload-file", str(payload))
    assert data["payload"] == {"report": "monthly", "ids": [1, 2, 3]}
    job = job_row(engine, schema, data["id"])
    assert job is not None and job["payload"] == data["payload"]


def test_add_run_at_now_is_runnable(cli: Cli, engine: Engine, schema: str) -> None:
    job = job_row(engine, schema, add(cli, "t", "--run-at", "now"))
    assert job is not None and job["due"] is True


def test_add_with_key_and_mode(cli: Cli, engine: Engine, schema: str) -> None:
    first = cli.json("add", "sync", "--payload", '{"v": 1}', "--key", "k", "--run-at", FAR_FUTURE)
    replaced = cli.json(
        "add", "sync", "--payload", '{"v": 2}', "--key", "k", "--job-key-mode", "replace"
    )
    assert replaced["id"] == first["id"]
    assert replaced["revision"] == 1
    kept = cli.json(
        "add", "sync", "--payload", '{"v": 3}', "--key", "k", "--job-key-mode", "unsafe_dedupe"
    )
    assert kept["id"] == first["id"]
    job = job_row(engine, schema, first["id"])
    assert job is not None
    assert job["payload"] == {"v": 2}
    assert sql(engine, "select count(*) as n from {s}._private_jobs", schema) == [{"n": 1}]


def test_add_bad_json_payload(cli: Cli, engine: Engine, schema: str) -> None:
    usage_error(cli("add", "t", "--payload", "{not json"), "--payload", "not valid JSON")
    assert sql(engine, "select count(*) as n from {s}._private_jobs", schema) == [{"n": 0}]


def test_add_bad_json_payload_file(cli: Cli, tmp_path: Path) -> None:
    payload = tmp_path / "bad.json"
    payload.write_text("[1, 2", encoding="utf-8")
    usage_error(cli("add", "t", "--payload-file", str(payload)), "--payload-file", "not valid JSON")


def test_add_job_key_mode_needs_a_key(cli: Cli, engine: Engine, schema: str) -> None:
    usage_error(cli("add", "t", "--job-key-mode", "replace"), "--job-key-mode", "--key")
    assert sql(engine, "select count(*) as n from {s}._private_jobs", schema) == [{"n": 0}]


def test_add_unknown_job_key_mode(cli: Cli) -> None:
    usage_error(cli("add", "t", "--key", "k", "--job-key-mode", "sometimes"), "--job-key-mode")


def test_add_payload_and_payload_file_together(cli: Cli, tmp_path: Path) -> None:
    payload = tmp_path / "p.json"
    payload.write_text("{}", encoding="utf-8")
    result = cli("add", "t", "--payload", "{}", "--payload-file", str(payload))
    usage_error(result, "--payload", "--payload-file", "not both")


@pytest.mark.parametrize(
    ("run_at", "fragment"),
    [("2026-01-02T03:04:05", "no time zone"), ("next tuesday", "not an RFC 3339 time")],
)
def test_add_bad_run_at(cli: Cli, run_at: str, fragment: str) -> None:
    usage_error(cli("add", "t", "--run-at", run_at), "--run-at", fragment)


def test_add_max_attempts_below_one(cli: Cli) -> None:
    usage_error(cli("add", "t", "--max-attempts", "0"), "--max-attempts")


def test_add_priority_out_of_range_is_a_runtime_error(cli: Cli) -> None:
    runtime_error(cli("add", "t", "--priority", "40000"), "out of range")


# -- list -------------------------------------------------------------------------------


@pytest.fixture
def jobs_in_every_state(cli: Cli, engine: Engine, schema: str) -> dict[str, int]:
    ids = {
        "ready": add(cli, "email", "--payload", '{"n": 1}', "--queue", "mail", "--key", "r1"),
        "scheduled": add(cli, "email", "--run-at", FAR_FUTURE),
        "locked": add(cli, "report", "--queue", "reports"),
        "failed": add(cli, "report", "--max-attempts", "2"),
    }
    lock(engine, schema, ids["locked"], "worker-a")
    cli.ok("fail", str(ids["failed"]), "--reason", "bad data\nsecond line")
    return ids


@pytest.mark.parametrize("state", ["ready", "scheduled", "locked", "failed"])
def test_list_state_json(cli: Cli, jobs_in_every_state: dict[str, int], state: str) -> None:
    listed = cli.json("list", "--state", state)
    assert [job["id"] for job in listed] == [jobs_in_every_state[state]]


def test_list_all_json_matches_the_database(
    cli: Cli, engine: Engine, schema: str, jobs_in_every_state: dict[str, int]
) -> None:
    listed = cli.json("list")
    assert {job["id"] for job in listed} == set(jobs_in_every_state.values())
    for job in listed:
        row = job_row(engine, schema, job["id"])
        assert row is not None
        for field in ("task_identifier", "queue_name", "payload", "attempts", "max_attempts"):
            assert job[field] == row[field], field
        assert job["locked_by"] == row["locked_by"]
        assert job["last_error"] == row["last_error"]
        assert datetime.fromisoformat(job["run_at"]) == row["run_at"]


def test_list_human_table(cli: Cli, jobs_in_every_state: dict[str, int]) -> None:
    rows = parse_table(cli.ok("list"), JOB_COLUMNS)
    by_id = {int(row["ID"]): row for row in rows}
    assert set(by_id) == set(jobs_in_every_state.values())
    for state, job_id in jobs_in_every_state.items():
        assert by_id[job_id]["STATE"] == state
    ready = by_id[jobs_in_every_state["ready"]]
    assert (ready["TASK"], ready["QUEUE"], ready["KEY"], ready["ATTEMPTS"]) == (
        "email",
        "mail",
        "r1",
        "0/25",
    )
    assert by_id[jobs_in_every_state["scheduled"]]["RUN AT"] == "2999-01-01 00:00:00Z"
    assert by_id[jobs_in_every_state["locked"]]["LOCKED BY"] == "worker-a"
    failed = by_id[jobs_in_every_state["failed"]]
    assert (failed["ATTEMPTS"], failed["LAST ERROR"]) == ("2/2", "bad data")


def test_list_filters_by_task_and_queue(cli: Cli, jobs_in_every_state: dict[str, int]) -> None:
    reports = cli.json("list", "--task", "report")
    assert {job["id"] for job in reports} == {
        jobs_in_every_state["locked"],
        jobs_in_every_state["failed"],
    }
    rows = parse_table(cli.ok("list", "--queue", "mail"), JOB_COLUMNS)
    assert [int(row["ID"]) for row in rows] == [jobs_in_every_state["ready"]]
    assert cli.ok("list", "--task", "email", "--queue", "reports").strip() == "No jobs."
    assert cli.json("list", "--task", "nothing") == []


def test_list_limit_and_offset(cli: Cli) -> None:
    ids = [add(cli, "page", "--priority", str(i)) for i in range(5)]
    assert [job["id"] for job in cli.json("list", "--limit", "2")] == ids[:2]
    assert [job["id"] for job in cli.json("list", "--limit", "2", "--offset", "2")] == ids[2:4]
    assert [job["id"] for job in cli.json("list", "--offset", "4")] == ids[4:]
    assert cli.json("list", "--limit", "0") == []


def test_list_json_after_the_command_name(cli: Cli) -> None:
    job_id = add(cli, "t")
    result = cli("list", "--json")
    assert result.exit_code == 0, result.stderr
    assert [job["id"] for job in json.loads(result.stdout)] == [job_id]


def test_list_unknown_state(cli: Cli) -> None:
    usage_error(cli("list", "--state", "pending"), "--state", "pending")


@pytest.mark.parametrize("option", ["--limit", "--offset"])
def test_list_negative_limit_or_offset(cli: Cli, option: str) -> None:
    usage_error(cli("list", option, "-1"), option)


# -- show -------------------------------------------------------------------------------


def test_show_human(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "email", "--payload", '{"to": "a@b.c", "n": [1]}', "--key", "k1")
    lock(engine, schema, job_id, "worker-x")
    out = cli.ok("show", str(job_id))
    lines = out.splitlines()
    fields = {line[:10].strip(): line[12:] for line in lines if line[:10].strip()}
    assert fields["id"] == str(job_id)
    assert fields["task"] == "email"
    assert fields["queue"] == "-"
    assert fields["state"] == "locked"
    assert fields["attempts"] == "1/25"
    assert fields["key"] == "k1"
    assert fields["locked by"] == "worker-x"
    assert fields["last error"] == "-"
    payload_at = next(i for i, line in enumerate(lines) if line.startswith("payload"))
    payload_text = "\n".join(line[12:] for line in lines[payload_at:])
    assert json.loads(payload_text) == {"to": "a@b.c", "n": [1]}


def test_show_json_matches_the_database(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "email", "--payload", '{"x": 1}', "--queue", "q", "--run-at", FAR_FUTURE)
    data = cli.json("show", str(job_id))
    row = job_row(engine, schema, job_id)
    assert row is not None
    assert data["id"] == job_id
    assert data["state"] == "scheduled"
    assert data["payload"] == row["payload"] == {"x": 1}
    assert data["queue_name"] == row["queue_name"] == "q"
    assert datetime.fromisoformat(data["run_at"]) == row["run_at"]
    assert datetime.fromisoformat(data["created_at"]) == row["created_at"]


def test_show_missing_job(cli: Cli) -> None:
    runtime_error(cli("show", "999999"), "no job with id 999999")
    data = json_error(cli("show", "999999", as_json=True), "not_found", "no job with id 999999")
    assert data["missing"] == [999999]


def test_show_needs_an_integer_id(cli: Cli) -> None:
    usage_error(cli("show", "abc"), "JOB_ID")


# -- complete / fail --------------------------------------------------------------------


def test_complete_human_skips_locked_jobs(cli: Cli, engine: Engine, schema: str) -> None:
    first, second, locked = add(cli, "a"), add(cli, "a"), add(cli, "a")
    other = add(cli, "a")
    lock(engine, schema, locked, "w")
    out = cli.ok("complete", str(first), str(second), str(locked))
    assert out.splitlines() == [
        f"Completed 2 job(s): {first}, {second}.",
        f"Skipped (locked by a worker): {locked}.",
    ]
    remaining = sql(engine, "select id from {s}._private_jobs order by id", schema)
    assert [row["id"] for row in remaining] == [locked, other]


def test_complete_json(cli: Cli, engine: Engine, schema: str) -> None:
    job_id, locked = add(cli, "a"), add(cli, "a")
    lock(engine, schema, locked, "w")
    data = cli.json("complete", str(job_id), str(locked))
    assert data == {"completed": [job_id], "skipped": [locked]}
    assert job_row(engine, schema, job_id) is None
    assert job_row(engine, schema, locked) is not None


def test_complete_needs_ids(cli: Cli) -> None:
    usage_error(cli("complete"), "JOB_IDS")


def test_fail_human_with_reason(cli: Cli, engine: Engine, schema: str) -> None:
    job_id, untouched = add(cli, "a"), add(cli, "a")
    out = cli.ok("fail", str(job_id), "--reason", "invalid payload")
    assert out.strip() == f"Failed 1 job(s): {job_id}."
    row = job_row(engine, schema, job_id)
    assert row is not None
    assert row["attempts"] == row["max_attempts"] == 25
    assert row["last_error"] == "invalid payload"
    other = job_row(engine, schema, untouched)
    assert other is not None and (other["attempts"], other["last_error"]) == (0, None)


def test_fail_json_skips_locked_jobs(cli: Cli, engine: Engine, schema: str) -> None:
    job_id, locked = add(cli, "a"), add(cli, "a")
    lock(engine, schema, locked, "w")
    data = cli.json("fail", str(job_id), str(locked))
    assert data == {"failed": [job_id], "skipped": [locked]}
    row = job_row(engine, schema, job_id)
    assert row is not None and row["attempts"] == row["max_attempts"]
    assert row["last_error"]  # a default reason is recorded
    held = job_row(engine, schema, locked)
    assert held is not None and held["attempts"] == 1


# -- reschedule -------------------------------------------------------------------------


def test_reschedule_human_run_at_and_fields(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a")
    out = cli.ok(
        "reschedule",
        str(job_id),
        "--run-at",
        "2999-06-01T12:00:00+02:00",
        "--priority",
        "7",
        "--attempts",
        "2",
        "--max-attempts",
        "9",
    )
    assert out.strip() == f"Rescheduled 1 job(s): {job_id}."
    row = job_row(engine, schema, job_id)
    assert row is not None
    assert row["run_at"] == datetime(2999, 6, 1, 10, tzinfo=timezone.utc)
    assert (row["priority"], row["attempts"], row["max_attempts"]) == (7, 2, 9)


def test_reschedule_now_makes_jobs_runnable(cli: Cli, engine: Engine, schema: str) -> None:
    ids = [add(cli, "a", "--run-at", FAR_FUTURE) for _ in range(2)]
    assert cli.json("list", "--state", "ready") == []
    data = cli.json("reschedule", *map(str, ids), "--now")
    assert data == {"rescheduled": ids, "skipped": []}
    for job_id in ids:
        row = job_row(engine, schema, job_id)
        assert row is not None and row["due"] is True
    assert [job["id"] for job in cli.json("list", "--state", "ready")] == ids


def test_reschedule_skips_locked_jobs(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a", "--run-at", FAR_FUTURE)
    lock(engine, schema, job_id, "w")
    data = cli.json("reschedule", str(job_id), "--priority", "3")
    assert data == {"rescheduled": [], "skipped": [job_id]}
    row = job_row(engine, schema, job_id)
    assert row is not None and row["priority"] == 0


def test_reschedule_run_at_and_now_together(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a", "--run-at", FAR_FUTURE)
    usage_error(cli("reschedule", str(job_id), "--now", "--run-at", "now"), "--run-at", "--now")
    row = job_row(engine, schema, job_id)
    assert row is not None and row["due"] is False


def test_reschedule_bad_time(cli: Cli) -> None:
    usage_error(cli("reschedule", "1", "--run-at", "soon"), "--run-at")


# -- remove -----------------------------------------------------------------------------


def test_remove_waiting_job_human(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a", "--key", "remove-me")
    out = cli.ok("remove", "remove-me")
    assert out.strip() == f"Job {job_id} removed."
    assert job_row(engine, schema, job_id) is None


def test_remove_running_job_stops_it_retrying(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a", "--key", "busy")
    lock(engine, schema, job_id, "w")
    data = cli.json("remove", "busy")
    assert data["removed"] is False
    assert data["job"]["id"] == job_id
    row = job_row(engine, schema, job_id)
    assert row is not None
    assert row["key"] is None
    assert row["attempts"] == row["max_attempts"]
    assert row["locked_by"] == "w"
    assert cli.ok("show", str(job_id)).splitlines()[3].split() == ["state", "locked"]


def test_remove_json_waiting_job(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a", "--key", "k")
    data = cli.json("remove", "k")
    assert data["removed"] is True
    assert data["job"]["id"] == job_id and data["job"]["key"] == "k"
    assert job_row(engine, schema, job_id) is None


def test_remove_unknown_key(cli: Cli) -> None:
    runtime_error(cli("remove", "nope"), "no job with key 'nope'")


# -- cleanup ----------------------------------------------------------------------------


@pytest.fixture
def garbage(cli: Cli) -> dict[str, int]:
    """A permanently failed job, plus a task identifier and a queue no job uses any more."""
    done = add(cli, "ephemeral", "--queue", "temp-queue")
    cli.ok("complete", str(done))
    failed = add(cli, "doomed", "--queue", "doomed-queue")
    cli.ok("fail", str(failed))
    return {"failed": failed}


def names(engine: Engine, schema: str) -> tuple[set[str], set[str]]:
    tasks = {
        r["identifier"] for r in sql(engine, "select identifier from {s}._private_tasks", schema)
    }
    queues = {
        r["queue_name"]
        for r in sql(engine, "select queue_name from {s}._private_job_queues", schema)
    }
    return tasks, queues


def test_cleanup_without_tasks_only_collects_garbage(
    cli: Cli, engine: Engine, schema: str, garbage: dict[str, int]
) -> None:
    assert names(engine, schema) == ({"ephemeral", "doomed"}, {"temp-queue", "doomed-queue"})
    out = cli.ok("cleanup")
    assert out.strip() == "Ran gc-task-identifiers, gc-job-queues."
    assert names(engine, schema) == ({"doomed"}, {"doomed-queue"})
    assert job_row(engine, schema, garbage["failed"]) is not None


def test_cleanup_json_deletes_failed_jobs_only_when_named(
    cli: Cli, engine: Engine, schema: str, garbage: dict[str, int]
) -> None:
    assert cli.json("cleanup") == {"ran": ["GC_TASK_IDENTIFIERS", "GC_JOB_QUEUES"]}
    assert job_row(engine, schema, garbage["failed"]) is not None
    waiting = add(cli, "a")
    data = cli.json("cleanup", "delete-permanently-failed-jobs")
    assert data == {"ran": ["DELETE_PERMANENTLY_FAILED_JOBS"]}
    assert job_row(engine, schema, garbage["failed"]) is None
    assert job_row(engine, schema, waiting) is not None
    # the queue of the deleted job is only collected when asked for
    assert "doomed-queue" in names(engine, schema)[1]
    assert cli.json("cleanup", "gc_job_queues") == {"ran": ["GC_JOB_QUEUES"]}
    assert "doomed-queue" not in names(engine, schema)[1]


def test_cleanup_unknown_task(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "a")
    cli.ok("fail", str(job_id))
    usage_error(cli("cleanup", "gc-job-queues", "delete-everything"), "delete-everything")
    assert job_row(engine, schema, job_id) is not None


# -- force-unlock -----------------------------------------------------------------------


def test_force_unlock_releases_exactly_those_workers(cli: Cli, engine: Engine, schema: str) -> None:
    a = add(cli, "t", "--queue", "qa")
    b = add(cli, "t")
    c = add(cli, "t", "--queue", "qc")
    lock(engine, schema, a, "dead-1")
    lock(engine, schema, b, "dead-2")
    lock(engine, schema, c, "alive")
    sql(
        engine,
        "update {s}._private_job_queues set locked_by = case queue_name when 'qa' then 'dead-1'"
        " else 'alive' end, locked_at = now()",
        schema,
    )
    out = cli.ok("force-unlock", "dead-1", "dead-2")
    assert out.strip() == "Released 2 job lock(s) and 1 queue lock(s) of 2 worker id(s)."
    holders = {
        r["id"]: r["locked_by"]
        for r in sql(engine, "select id, locked_by from {s}._private_jobs", schema)
    }
    assert holders == {a: None, b: None, c: "alive"}
    queues = {
        r["queue_name"]: r["locked_by"]
        for r in sql(engine, "select queue_name, locked_by from {s}._private_job_queues", schema)
    }
    assert queues == {"qa": None, "qc": "alive"}


def test_force_unlock_json(cli: Cli, engine: Engine, schema: str) -> None:
    job_id = add(cli, "t")
    lock(engine, schema, job_id, "gone")
    assert cli.json("force-unlock", "gone") == {
        "unlocked_worker_ids": ["gone"],
        "released_job_locks": 1,
        "released_queue_locks": 0,
    }
    row = job_row(engine, schema, job_id)
    assert row is not None and (row["locked_by"], row["locked_at"]) == (None, None)


def test_force_unlock_needs_ids(cli: Cli) -> None:
    usage_error(cli("force-unlock"), "WORKER_IDS")


# -- sweep-stale-workers ----------------------------------------------------------------


@pytest.fixture
def stale_worker(cli: Cli, engine: Engine, schema: str) -> dict[str, int]:
    """``dead-w`` stopped heartbeating an hour ago holding a job; ``live-w`` is fine."""
    register_worker(engine, schema, "dead-w", "1 hour")
    register_worker(engine, schema, "live-w", "0 seconds")
    dead_job = add(cli, "t", "--queue", "dq")
    live_job = add(cli, "t")
    lock(engine, schema, dead_job, "dead-w", age="1 hour")
    lock(engine, schema, live_job, "live-w")
    sql(
        engine,
        "update {s}._private_job_queues set locked_by = 'dead-w', locked_at = now()",
        schema,
    )
    return {"dead": dead_job, "live": live_job}


def registered(engine: Engine, schema: str) -> set[str]:
    rows = sql(engine, "select worker_id from {s}._sqla_graphile_workers", schema)
    return {row["worker_id"] for row in rows}


def test_sweep_dry_run_changes_nothing(
    cli: Cli, engine: Engine, schema: str, stale_worker: dict[str, int]
) -> None:
    before = [job_row(engine, schema, job_id) for job_id in stale_worker.values()]
    out = cli.ok("sweep-stale-workers", "--dry-run")
    assert out.strip() == "Would recover 1 job(s) and 1 queue(s) from 1 worker(s): dead-w."
    data = cli.json("sweep-stale-workers", "--dry-run")
    assert data["dry_run"] is True
    assert data["worker_ids"] == ["dead-w"]
    assert data["job_ids"] == [stale_worker["dead"]]
    assert data["queue_names"] == ["dq"]
    assert data["recovered_count"] == 1
    assert [job_row(engine, schema, job_id) for job_id in stale_worker.values()] == before
    assert registered(engine, schema) == {"dead-w", "live-w"}


def test_sweep_recovers_dead_workers_jobs(
    cli: Cli, engine: Engine, schema: str, stale_worker: dict[str, int]
) -> None:
    data = cli.json("sweep-stale-workers", "--recovery-delay", "0s")
    assert data["dry_run"] is False
    assert (data["worker_ids"], data["job_ids"]) == (["dead-w"], [stale_worker["dead"]])
    assert data["recovered_count"] == 1
    dead = job_row(engine, schema, stale_worker["dead"])
    assert dead is not None
    assert (dead["locked_by"], dead["attempts"], dead["due"]) == (None, 1, True)
    assert "dead-w" in dead["last_error"]
    live = job_row(engine, schema, stale_worker["live"])
    assert live is not None and live["locked_by"] == "live-w"
    assert registered(engine, schema) == {"live-w"}
    queue = sql(engine, "select locked_by from {s}._private_job_queues", schema)
    assert queue == [{"locked_by": None}]


def test_sweep_human_and_threshold(
    cli: Cli, engine: Engine, schema: str, stale_worker: dict[str, int]
) -> None:
    out = cli.ok("sweep-stale-workers", "--sweep-threshold", "2h")
    assert out.strip() == "Recovered 0 job(s) and 0 queue(s) from 0 worker(s)."
    assert registered(engine, schema) == {"dead-w", "live-w"}
    out = cli.ok("sweep-stale-workers", "--sweep-threshold", "30m", "--recovery-delay", "1h30m")
    assert out.strip() == "Recovered 1 job(s) and 1 queue(s) from 1 worker(s): dead-w."
    row = job_row(engine, schema, stale_worker["dead"])
    assert row is not None and row["locked_by"] is None and row["due"] is False


@pytest.mark.parametrize("option", ["--sweep-threshold", "--recovery-delay"])
def test_sweep_bad_duration(cli: Cli, option: str) -> None:
    usage_error(cli("sweep-stale-workers", option, "soon"), option, "not a duration")


# -- workers ----------------------------------------------------------------------------


@pytest.fixture
def worker_landscape(cli: Cli, engine: Engine, schema: str) -> None:
    register_worker(engine, schema, "py-old", "1 hour", pid=4242, host="box-1")
    register_worker(engine, schema, "py-new", "0 seconds")
    job_a = add(cli, "t", "--queue", "nq")
    job_b = add(cli, "t")
    lock(engine, schema, job_a, "node-w")
    lock(engine, schema, job_b, "py-old", age="1 hour")
    sql(
        engine, "update {s}._private_job_queues set locked_by = 'node-w', locked_at = now()", schema
    )


def test_workers_human(cli: Cli, worker_landscape: None) -> None:
    out = cli.ok("workers")
    registered_part, holders_part = out.strip().split("\n\n")
    title, table_ = registered_part.split("\n", 1)
    assert title == "Registered workers:"
    rows = {
        r["WORKER"]: r
        for r in parse_table(table_, ["WORKER", "STARTED", "HEARTBEAT AGE", "STALE", "PID", "HOST"])
    }
    assert set(rows) == {"py-old", "py-new"}
    assert rows["py-old"]["HEARTBEAT AGE"].startswith("1h")
    assert (rows["py-old"]["STALE"], rows["py-old"]["PID"], rows["py-old"]["HOST"]) == (
        "yes",
        "4242",
        "box-1",
    )
    assert (rows["py-new"]["STALE"], rows["py-new"]["PID"]) == ("no", "-")
    title, table_ = holders_part.split("\n", 1)
    assert title == "Lock holders:"
    holders = {
        r["WORKER"]: r
        for r in parse_table(
            table_, ["WORKER", "JOBS", "QUEUES", "OLDEST LOCK AGE", "HEARTBEAT AGE"]
        )
    }
    assert set(holders) == {"node-w", "py-old"}
    assert (holders["node-w"]["JOBS"], holders["node-w"]["QUEUES"]) == ("1", "1")
    assert holders["node-w"]["HEARTBEAT AGE"].startswith("never")
    assert holders["py-old"]["HEARTBEAT AGE"].startswith("1h")
    assert holders["py-old"]["OLDEST LOCK AGE"].startswith("1h")


def test_workers_json(cli: Cli, worker_landscape: None) -> None:
    data = cli.json("workers", "--threshold", "30m")
    workers = {w["worker_id"]: w for w in data["registered"]}
    assert set(workers) == {"py-old", "py-new"}
    assert workers["py-old"]["is_stale"] is True
    assert workers["py-old"]["heartbeat_age"] >= 3600
    assert workers["py-old"]["metadata"] == {"pid": 4242, "host": "box-1"}
    assert workers["py-new"]["is_stale"] is False
    assert workers["py-new"]["heartbeat_age"] < 1800
    holders = {h["worker_id"]: h for h in data["lock_holders"]}
    assert holders["node-w"]["registered"] is False
    assert holders["node-w"]["last_heartbeat_at"] is None
    assert (holders["node-w"]["locked_jobs"], holders["node-w"]["locked_queues"]) == (1, 1)
    assert holders["py-old"]["registered"] is True
    assert (holders["py-old"]["locked_jobs"], holders["py-old"]["locked_queues"]) == (1, 0)
    # a larger threshold makes the old worker live again
    again = cli.json("workers", "--threshold", "2h")
    assert all(w["is_stale"] is False for w in again["registered"])


def test_workers_with_nothing(cli: Cli) -> None:
    assert cli.ok("workers").splitlines() == [
        "Registered workers:",
        "  none",
        "",
        "Lock holders:",
        "  none",
    ]
    assert cli.json("workers") == {"registered": [], "lock_holders": []}


# -- stats ------------------------------------------------------------------------------


STATS_COLUMNS = ["READY", "SCHEDULED", "LOCKED", "FAILED", "TOTAL", "OLDEST READY"]


def test_stats_json_counts_by_state_and_queue(
    cli: Cli, engine: Engine, schema: str, jobs_in_every_state: dict[str, int]
) -> None:
    add(cli, "email", "--queue", "mail")
    sql(engine, "update {s}._private_job_queues set locked_by = 'w', locked_at = now()", schema)
    data = cli.json("stats")
    assert {k: data[k] for k in ("ready", "scheduled", "locked", "failed", "total")} == {
        "ready": 2,
        "scheduled": 1,
        "locked": 1,
        "failed": 1,
        "total": 5,
    }
    assert data["oldest_ready_age"] >= 0
    queues = {q["queue_name"]: q for q in data["queues"]}
    assert {name: q["jobs"] for name, q in queues.items()} == {"mail": 2, "reports": 1}
    assert queues["mail"]["locked_by"] == "w"


def test_stats_human(cli: Cli, jobs_in_every_state: dict[str, int]) -> None:
    out = cli.ok("stats")
    counts, queues = out.strip().split("\n\n")
    (row,) = parse_table(counts, STATS_COLUMNS)
    assert {k: row[k] for k in STATS_COLUMNS[:5]} == {
        "READY": "1",
        "SCHEDULED": "1",
        "LOCKED": "1",
        "FAILED": "1",
        "TOTAL": "4",
    }
    assert row["OLDEST READY"] != "-"
    per_queue = parse_table(queues, ["QUEUE", "JOBS", "LOCKED BY"])
    assert per_queue == [
        {"QUEUE": "mail", "JOBS": "1", "LOCKED BY": "-"},
        {"QUEUE": "reports", "JOBS": "1", "LOCKED BY": "-"},
    ]


def test_stats_of_an_empty_queue(cli: Cli) -> None:
    (row,) = parse_table(cli.ok("stats"), STATS_COLUMNS)
    assert row == dict.fromkeys(STATS_COLUMNS[:5], "0") | {"OLDEST READY": "-"}
    data = cli.json("stats")
    assert data["total"] == 0 and data["oldest_ready_age"] is None and data["queues"] == []


# -- errors shared by every command -----------------------------------------------------


COMMANDS_NEEDING_THE_SCHEMA = [
    ["add", "t"],
    ["list"],
    ["show", "1"],
    ["complete", "1"],
    ["fail", "1"],
    ["reschedule", "1", "--now"],
    ["remove", "k"],
    ["cleanup"],
    ["force-unlock", "w"],
    ["sweep-stale-workers"],
    ["workers"],
    ["stats"],
]


@pytest.mark.parametrize("args", COMMANDS_NEEDING_THE_SCHEMA, ids=lambda a: a[0])
def test_unmigrated_schema(database_url: str, schema_name: str, args: list[str]) -> None:
    cli = Cli(database_url, schema_name)
    runtime_error(cli(*args), "schema not migrated", repr(schema_name))
    data = json_error(cli(*args, as_json=True), "error", "schema not migrated")
    assert data["exception"] == "SchemaNotMigrated"


@pytest.fixture
def unreachable_url() -> str:
    # port 1 on the loopback interface: nothing listens there
    return "postgresql://operator:s3cr%40t-pw@127.0.0.1:1/jobs"


def test_unreachable_database(unreachable_url: str) -> None:
    result = invoke(["--database-url", unreachable_url, "list"])
    line = runtime_error(result, "cannot reach the database", "127.0.0.1:1/jobs")
    assert "***" in line
    assert "s3cr" not in result.stdout + result.stderr


def test_unreachable_database_verbose_shows_a_redacted_traceback(unreachable_url: str) -> None:
    result = invoke(["--database-url", unreachable_url, "--verbose", "stats"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: cannot reach the database")
    assert "s3cr" not in result.stderr


def test_database_url_from_the_environment(cli: Cli) -> None:
    job_id = add(cli, "t")
    result = invoke(
        ["--json", "list"], env={"DATABASE_URL": cli.url, "GRAPHILE_WORKER_SCHEMA": cli.schema}
    )
    assert result.exit_code == 0, result.stderr
    assert [job["id"] for job in json.loads(result.stdout)] == [job_id]


@pytest.mark.parametrize("args", [["list"], ["stats"], ["migrate"]])
def test_no_database_url_at_all(args: list[str]) -> None:
    usage_error(invoke(args), "--database-url", "DATABASE_URL")
    json_error(invoke(["--json", *args]), "usage", "DATABASE_URL", exit_code=2)


def test_database_url_that_is_not_a_url() -> None:
    usage_error(invoke(["--database-url", "not a url", "stats"]), "not a database URL")


def test_invalid_schema_name(database_url: str) -> None:
    usage_error(invoke(["--database-url", database_url, "--schema", "x" * 70, "stats"]), "--schema")


@pytest.fixture
def held_row(engine: Engine, cli: Cli, schema: str) -> Iterator[int]:
    """A job whose row another transaction holds ``FOR UPDATE`` while the test runs."""
    job_id = add(cli, "t")
    connection: Connection = engine.connect()
    transaction = connection.begin()
    connection.execute(
        text(f"select 1 from {quote_schema(schema)}._private_jobs where id = :id for update"),
        {"id": job_id},
    )
    try:
        yield job_id
    finally:
        transaction.rollback()
        connection.close()


def test_statement_error_of_a_reachable_database_is_not_a_connection_error(
    cli: Cli, engine: Engine, schema: str, held_row: int
) -> None:
    url = make_url(cli.url).update_query_dict({"options": "-c lock_timeout=50"})
    impatient = Cli(url.render_as_string(hide_password=False), cli.schema)
    line = runtime_error(impatient("complete", str(held_row)), "database error", "lock timeout")
    assert "cannot reach" not in line


# -- the real entry points --------------------------------------------------------------


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=_subprocess_env(), timeout=60, check=False
    )


def console_script() -> str:
    script = Path(sys.executable).parent / (
        "graphile-worker.exe" if sys.platform == "win32" else "graphile-worker"
    )
    assert script.exists(), f"console script not installed next to {sys.executable}"
    return str(script)


def test_python_dash_m_entry_point(engine: Engine, database_url: str, schema: str) -> None:
    common = ["--database-url", database_url, "--schema", schema]
    added = run(sys.executable, "-m", "sqla_graphile", *common, "--json", "add", "hello")
    assert added.returncode == 0, added.stderr
    job_id = json.loads(added.stdout)["id"]
    assert job_row(engine, schema, job_id) is not None
    missing = run(sys.executable, "-m", "sqla_graphile", *common, "show", "999999")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.splitlines() == ["error: no job with id 999999"]
    bad = run(sys.executable, "-m", "sqla_graphile", *common, "add", "x", "--payload", "{")
    assert bad.returncode == 2
    assert "Usage: graphile-worker add" in bad.stderr


def test_console_script(engine: Engine, database_url: str, schema: str) -> None:
    common = ["--database-url", database_url, "--schema", schema]
    script = console_script()
    added = run(script, *common, "add", "hello", "--payload", '{"a": 1}')
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("Added job ")
    stats = run(script, *common, "--json", "stats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["ready"] == 1
    assert run(script, *common, "list", "--state", "bogus").returncode == 2
    no_url = run(script, "stats")
    assert no_url.returncode == 2
    assert "DATABASE_URL" in no_url.stderr
    version = run(script, "--version")
    assert version.returncode == 0 and version.stdout.strip()
