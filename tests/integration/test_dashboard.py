"""The dashboard over HTTP (Starlette's test client), on a real PostgreSQL.

Read-only mode, CSRF, the authentication hook, each action's effect on the database,
escaping, filters and keyset paging. The browser tests (tests/browser) drive the same
pages in Chromium.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.testclient import TestClient

from sqla_graphile import JobSpec, RawJobSpec, WorkerUtils
from sqla_graphile.cli import main
from sqla_graphile.dashboard import CSRF_COOKIE, create_app
from sqla_graphile.schema import quote_schema

HOSTILE = "<script>window.__pwned = 1</script>"


@pytest.fixture
def utils(engine: Engine, schema: str) -> WorkerUtils:
    return WorkerUtils(engine, schema)


def client_of(database_url: str, schema: str, **options: Any) -> TestClient:
    options.setdefault("sample_interval", None)
    return TestClient(create_app(database_url, schema=schema, **options))


@pytest.fixture
def client(database_url: str, schema: str) -> Iterator[TestClient]:
    with client_of(database_url, schema, actions=True) as c:
        yield c


def token(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if found is not None:
        return found.group(1)
    # A page without a form: the token a form would carry, for the cookie just set.
    csrf = client.app.state.dashboard.csrf  # type: ignore[attr-defined]
    return str(csrf._sign(client.cookies[CSRF_COOKIE]))


def job_ids(html: str) -> list[int]:
    return [int(found) for found in re.findall(r'data-job-id="(\d+)"', html)]


def row(engine: Engine, schema: str, job_id: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            text(f"select * from {quote_schema(schema)}._private_jobs where id = :id"),
            {"id": job_id},
        ).one_or_none()


def test_every_page_renders(client: TestClient, utils: WorkerUtils) -> None:
    job = utils.add_raw_job("mail", {"to": "a"}, JobSpec(queue_name="q", job_key="k"))
    for path in ("/", "/jobs", f"/jobs/{job.id}", "/workers", "/cron"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "script-src" not in response.headers["content-security-policy"]
        assert "default-src 'none'" in response.headers["content-security-policy"]
    assert job_ids(client.get("/jobs").text) == [job.id]
    other = utils.add_raw_job("mail", {}, JobSpec(queue_name="q"))
    utils.permanently_fail_jobs([other.id], "no")
    overview = client.get("/").text
    assert 'data-count="ready">1<' in overview
    assert 'data-count="failed">1<' in overview
    assert 'data-count="total">2<' in overview
    # The named queue, its jobs summed over their states.
    assert re.search(r'>q</a></td><td class="num">2</td>', overview)


def test_values_are_escaped(client: TestClient, utils: WorkerUtils) -> None:
    job = utils.add_raw_job(
        HOSTILE, {"html": HOSTILE}, JobSpec(job_key=HOSTILE, queue_name=HOSTILE)
    )
    utils.permanently_fail_jobs([job.id], HOSTILE)
    for path in (f"/jobs/{job.id}", "/jobs", "/", f"/jobs?text={HOSTILE}"):
        html = client.get(path).text
        assert "<script>window" not in html, path
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html, path


def test_read_only_refuses_every_action(
    database_url: str, schema: str, engine: Engine, utils: WorkerUtils
) -> None:
    job = utils.add_raw_job("mail", {})
    with client_of(database_url, schema) as client:
        assert "Run now" not in client.get(f"/jobs/{job.id}").text
        assert client.get(f"/actions/complete?job_id={job.id}").status_code == 403
        nonce = token(client, "/jobs")
        response = client.post("/actions/complete", data={"job_id": job.id, "csrf_token": nonce})
        assert response.status_code == 403
        assert "read-only" in response.text
    assert row(engine, schema, job.id) is not None


def test_csrf_missing_or_wrong_is_refused(
    client: TestClient, engine: Engine, schema: str, utils: WorkerUtils, caplog: Any
) -> None:
    job = utils.add_raw_job("mail", {})
    good = token(client, f"/actions/complete?job_id={job.id}")
    caplog.set_level(logging.INFO, logger="sqla_graphile.dashboard.audit")
    for data in ({"job_id": job.id}, {"job_id": job.id, "csrf_token": good[:-1] + "0"}):
        assert client.post("/actions/complete", data=data).status_code == 403
    # The right token without its cookie (another browser) is refused too.
    other = TestClient(client.app)
    assert (
        other.post("/actions/complete", data={"job_id": job.id, "csrf_token": good}).status_code
        == 403
    )
    assert row(engine, schema, job.id) is not None
    assert sum("bad CSRF token" in r.getMessage() for r in caplog.records) == 3
    assert (
        client.post("/actions/complete", data={"job_id": job.id, "csrf_token": good}).status_code
        == 200
    )
    assert row(engine, schema, job.id) is None


def test_the_hook_refuses_or_names_the_operator(
    database_url: str, schema: str, utils: WorkerUtils, caplog: Any
) -> None:
    def refuse(request: Request) -> str | None:
        return None

    def challenge(request: Request) -> str | None:
        if request.headers.get("authorization") != "Bearer sesame":
            raise HTTPException(401, "log in", headers={"WWW-Authenticate": "Bearer"})
        return "ada"

    async def named(request: Request) -> str | None:
        return "grace"

    with client_of(database_url, schema, authenticate=refuse) as client:
        assert client.get("/").status_code == 403
        assert client.get("/jobs").status_code == 403
    with client_of(database_url, schema, authenticate=challenge) as client:
        response = client.get("/jobs")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/jobs", headers={"Authorization": "Bearer sesame"}).status_code == 200
    job = utils.add_raw_job("mail", {})
    caplog.set_level(logging.INFO, logger="sqla_graphile.dashboard.audit")
    with client_of(database_url, schema, authenticate=named, actions=True) as client:
        nonce = token(client, "/jobs")
        response = client.post("/actions/reschedule", data={"job_id": job.id, "csrf_token": nonce})
        assert response.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "sqla_graphile.dashboard.audit"]
    assert lines == [f"Run now: job_id '{job.id}' by grace: job {job.id} rescheduled to run now"]


def act(client: TestClient, name: str, **params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    confirm = client.get(f"/actions/{name}?{query}")
    assert confirm.status_code == 200
    nonce = token(client, f"/actions/{name}?{query}")
    response = client.post(f"/actions/{name}", data={**params, "csrf_token": nonce})
    assert response.status_code == 200, response.text
    found = re.search(r'id="outcome">([^<]*)<', response.text)
    assert found is not None
    return found.group(1)


def test_each_action_changes_the_database(
    client: TestClient, engine: Engine, schema: str, utils: WorkerUtils
) -> None:
    later = utils.add_raw_job("mail", {}, JobSpec(run_at=None, priority=0))
    utils.reschedule_jobs([later.id], None)
    with engine.begin() as connection:
        connection.execute(
            text(
                f"update {quote_schema(schema)}._private_jobs set run_at = now() + interval '1 day'"
            )
        )
    assert "rescheduled" in act(client, "reschedule", job_id=later.id)
    assert "ready" in client.get(f"/jobs/{later.id}").text
    failed = utils.add_raw_job("mail", {})
    assert "failed permanently" in act(client, "fail", job_id=failed.id, reason="bad data")
    assert row(engine, schema, failed.id).last_error == "bad data"
    done = utils.add_raw_job("mail", {})
    assert "completed" in act(client, "complete", job_id=done.id)
    assert row(engine, schema, done.id) is None
    keyed = utils.add_raw_job("mail", {}, JobSpec(job_key="nightly"))
    assert "removed" in act(client, "remove", key="nightly")
    assert row(engine, schema, keyed.id) is None
    assert "no job has the key" in act(client, "remove", key="nightly")
    held = utils.add_raw_job("mail", {})
    with engine.begin() as connection:
        connection.execute(
            text(
                f"update {quote_schema(schema)}._private_jobs set locked_by = 'w1',"
                " locked_at = now() where id = :id"
            ),
            {"id": held.id},
        )
    assert "unchanged" in act(client, "complete", job_id=held.id)
    assert "released" in act(client, "force_unlock", worker_id="w1")
    assert row(engine, schema, held.id).locked_by is None
    assert "swept stale workers" in act(client, "sweep")


def test_action_input_is_checked(client: TestClient) -> None:
    nonce = token(client, "/jobs")
    assert (
        client.post("/actions/fail", data={"job_id": "x", "csrf_token": nonce}).status_code == 400
    )
    assert client.post("/actions/nope", data={"csrf_token": nonce}).status_code == 404
    plain = client.post(
        "/actions/fail", content=b"{}", headers={"content-type": "application/json"}
    )
    assert plain.status_code == 415
    large = client.post("/actions/fail", data={"job_id": "1", "reason": "x" * 20_000})
    assert large.status_code == 413


def test_bad_filters_and_missing_jobs(client: TestClient) -> None:
    assert client.get("/jobs?state=bogus").status_code == 400
    assert client.get("/jobs?before=abc").status_code == 400
    assert client.get("/jobs/999999").status_code == 404


def test_filters(client: TestClient, utils: WorkerUtils) -> None:
    a = utils.add_raw_job("mail", {}, JobSpec(queue_name="emails", job_key="a-key"))
    b = utils.add_raw_job("sms", {})
    c = utils.add_raw_job("sms", {}, JobSpec(queue_name="emails"))
    utils.permanently_fail_jobs([b.id], "Connection REFUSED by host")
    assert job_ids(client.get("/jobs?task=sms").text) == [c.id, b.id]
    assert job_ids(client.get("/jobs?queue=emails").text) == [c.id, a.id]
    assert job_ids(client.get("/jobs?key=a-key").text) == [a.id]
    assert job_ids(client.get("/jobs?text=refused").text) == [b.id]
    assert job_ids(client.get("/jobs?state=failed").text) == [b.id]
    assert job_ids(client.get("/jobs?state=ready&task=sms").text) == [c.id]
    assert job_ids(client.get("/jobs?task=nothing").text) == []


def test_keyset_paging_has_no_duplicates_or_gaps(
    database_url: str, schema: str, utils: WorkerUtils
) -> None:
    jobs = utils.add_raw_jobs([RawJobSpec("t" if i % 3 else "third", {"i": i}) for i in range(60)])
    expected = sorted((j.id for j in jobs if j.task_identifier == "third"), reverse=True)
    everything = sorted((j.id for j in jobs), reverse=True)
    with client_of(database_url, schema, page_size=7, scan_limit=9) as client:
        for query, want in (("", everything), ("task=third&", expected)):
            seen: list[int] = []
            path = f"/jobs?{query}"
            for _ in range(100):
                html = client.get(path).text
                seen.extend(job_ids(html))
                found = re.search(r'href="([^"]+)" id="next-page"', html)
                if found is None:
                    break
                path = found.group(1).replace("&amp;", "&")
            assert seen == want
            assert 'id="end"' in html


def test_each_request_is_bounded_and_pages_read_only(database_url: str, schema: str) -> None:
    import asyncio

    from sqlalchemy import select
    from sqlalchemy.sql import func

    from sqla_graphile._urls import async_engine_from_url
    from sqla_graphile.dashboard._data import Database

    async def check() -> tuple[str, str]:
        engine = async_engine_from_url(database_url)
        try:
            async with Database(engine, schema, 1.5).transaction() as connection:
                timeout = await connection.scalar(select(func.current_setting("statement_timeout")))
                read_only = await connection.scalar(
                    select(func.current_setting("transaction_read_only"))
                )
        finally:
            await engine.dispose()
        return str(timeout), str(read_only)

    assert asyncio.run(check()) == ("1500ms", "on")


def test_cli_help_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "--enable-actions" in result.output
    for name in [m for m in sys.modules if m.startswith("sqla_graphile.dashboard")]:
        monkeypatch.delitem(sys.modules, name)
    # As if not installed: every module of the extra's packages, imported or not.
    for name in ["starlette", "jinja2", *sys.modules]:
        if name.split(".")[0] in ("starlette", "jinja2"):
            monkeypatch.setitem(sys.modules, name, None)
    result = runner.invoke(main, ["--database-url", "postgresql://x@127.0.0.1/x", "dashboard"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the dashboard needs the 'dashboard' extra: pip install 'sqla-graphile[dashboard]'"
    ]
