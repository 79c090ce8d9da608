"""The dashboard in a real browser: Debian's Chromium, driven by Playwright.

The app is served by uvicorn on a real PostgreSQL holding jobs added from Python and
from Node graphile-worker 0.18, a Node worker pool holding a lock, Python workers in the
heartbeat registry (one stale) and a known crontab item. Each page renders, the filters
work, each action changes the database as the page says, and a hostile payload is shown
as text. With ``SQLA_GRAPHILE_SCREENSHOTS=<dir>`` each page is also saved as a PNG there
(``docs/images`` holds the documentation's).

Chromium must be installed (``apt-get install chromium``; ``.ci/run`` does it): the
tests fail, not skip, without it. Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from interop_fixtures import NodeProcess
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, text

from sqla_graphile import JobSpec, WorkerUtils, migrate
from sqla_graphile._drive import drive
from sqla_graphile.dashboard import create_app
from sqla_graphile.recovery import heartbeat_op
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

HOSTILE = "<script>window.__pwned = 1</script>"
HOSTILE_ERROR = '<img src=x onerror="window.__pwned = 2">'
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CRONTAB = "0 4 * * * nightly_report ?id=nightly\n*/5 * * * * poll_feeds\n"


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed: the browser tests need Debian's package "
            "(apt-get install chromium; .ci/run installs it)"
        )
    return found


class Server:
    """A uvicorn server of ``app`` on a free port of this host, in a thread."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def sql(engine: Engine, statement: str, **params: Any) -> list[Any]:
    with engine.begin() as connection:
        result = connection.execute(text(statement), params)
        return list(result) if result.returns_rows else []


@pytest.fixture(scope="module")
def world(engine: Engine, database_url: str, node: NodeProcess) -> Iterator[dict[str, Any]]:
    """The schema and what is in it; the Node pool stopped at the end."""
    schema = "gw_browser"
    q = quote_schema(schema)
    sql(engine, f"drop schema if exists {q} cascade")
    migrate(engine, schema=schema)
    utils = WorkerUtils(engine, schema)
    mails = [
        utils.add_raw_job(
            "send_email", {"to": f"user{i}@example.com"}, JobSpec(queue_name="emails")
        )
        for i in range(3)
    ]
    welcome = utils.add_raw_job(
        "send_email", {"to": "new@example.com"}, JobSpec(job_key="welcome-1")
    )
    hostile = utils.add_raw_job("render", {"html": HOSTILE}, JobSpec(job_key=HOSTILE))
    utils.permanently_fail_jobs([hostile.id], HOSTILE_ERROR)
    node_job = node.call(
        "addJob",
        schema=schema,
        identifier="node_task",
        payload={"from": "node"},
        spec={"jobKey": "node-key", "queueName": "node-queue", "flags": ["bulk"]},
    )
    # A Node worker pool running a long job: a lock holder without a heartbeat.
    pool_id = node.start_pool("dash", schema, {"node_slow": {"sleepMs": 600_000}})
    node.call("addJob", schema=schema, identifier="node_slow", payload={}, spec={})
    deadline = time.monotonic() + 60
    while not sql(engine, f"select 1 from {q}._private_jobs where locked_by = :p", p=pool_id):
        assert time.monotonic() < deadline, "the Node pool did not lock its job"
        time.sleep(0.2)
    # Python workers in the registry: one fresh, one stale holding a job.
    with engine.begin() as connection:
        for worker_id in ("py-fresh", "py-stale"):
            drive(connection, heartbeat_op(schema, worker_id, {"hostname": "web-1", "pid": 7}))
    stuck = utils.add_raw_job("resize", {"image": 1})
    sql(
        engine,
        f"update {q}._sqla_graphile_workers set last_heartbeat_at = now() - interval '10 min'"
        " where worker_id = 'py-stale'",
    )
    sql(
        engine,
        f"update {q}._private_jobs set locked_by = 'py-stale', locked_at = now() - interval"
        " '10 min' where id = :id",
        id=stuck.id,
    )
    sql(
        engine,
        f"insert into {q}._private_known_crontabs (identifier, known_since, last_execution)"
        " values ('nightly', now() - interval '3 days', now() - interval '20 hours')",
    )
    app = create_app(database_url, schema=schema, actions=True, crontab=CRONTAB)
    server = Server(app)
    try:
        yield {
            "schema": schema,
            "url": server.url,
            "utils": utils,
            "mails": mails,
            "welcome": welcome,
            "hostile": hostile,
            "node_job_id": int(node_job["id"]),
            "pool_id": pool_id,
            "stuck": stuck,
        }
    finally:
        server.stop()
        node.call("stop", name="dash")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    try:
        yield tab
    finally:
        context.close()


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("SQLA_GRAPHILE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)


def listed(page: Page) -> list[int]:
    return [
        int(v)
        for v in page.locator("#jobs tr[data-job-id]").evaluate_all(
            "rows => rows.map(r => r.dataset.jobId)"
        )
    ]


def test_each_page_renders(page: Page, world: dict[str, Any], engine: Engine) -> None:
    q = quote_schema(world["schema"])
    total = sql(engine, f"select count(*) from {q}._private_jobs")[0][0]
    page.goto(world["url"] + "/")
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator('[data-count="total"]')).to_have_text(str(total))
    expect(page.locator('[data-count="failed"]')).to_have_text("1")
    expect(page.locator("#groups")).to_contain_text("node_task")
    expect(page.locator("#queues")).to_contain_text("node-queue")
    screenshot(page, "overview")

    page.goto(world["url"] + "/jobs")
    assert len(listed(page)) == total
    expect(page.locator(f'tr[data-job-id="{world["node_job_id"]}"]')).to_contain_text("node_task")
    screenshot(page, "jobs")

    page.goto(world["url"] + f"/jobs/{world['node_job_id']}")
    expect(page.locator("#job-task")).to_have_text("node_task")
    expect(page.locator("#job-flags")).to_have_text("bulk")
    expect(page.locator("#job-payload")).to_contain_text('"from": "node"')
    screenshot(page, "job")

    page.goto(world["url"] + "/workers")
    expect(page.locator('#registered tr[data-worker-id="py-fresh"]')).to_be_visible()
    expect(page.locator('#registered tr[data-worker-id="py-stale"]')).to_contain_text("stale")
    expect(page.locator(f'#unregistered tr[data-worker-id="{world["pool_id"]}"]')).to_be_visible()
    screenshot(page, "workers")

    page.goto(world["url"] + "/cron")
    nightly = page.locator('tr[data-cron-id="nightly"]')
    expect(nightly).to_contain_text("0 4 * * *")
    expect(nightly).to_contain_text("ago")  # its last run
    expect(page.locator('tr[data-cron-id="poll_feeds"]')).to_contain_text("in ")  # next run
    screenshot(page, "cron")


def test_filters(page: Page, world: dict[str, Any]) -> None:
    page.goto(world["url"] + "/jobs")
    page.select_option("select[name=state]", "failed")
    page.click("#filters button[type=submit]")
    assert listed(page) == [world["hostile"].id]
    page.goto(world["url"] + "/jobs")
    page.fill("input[name=task]", "node_task")
    page.click("#filters button[type=submit]")
    assert listed(page) == [world["node_job_id"]]
    page.goto(world["url"] + "/jobs")
    page.fill("input[name=queue]", "emails")
    page.click("#filters button[type=submit]")
    assert listed(page) == sorted((job.id for job in world["mails"]), reverse=True)
    page.goto(world["url"] + "/jobs")
    page.fill("input[name=key]", "welcome-1")
    page.click("#filters button[type=submit]")
    assert listed(page) == [world["welcome"].id]
    page.goto(world["url"] + "/jobs")
    page.fill("input[name=text]", "ONERROR")
    page.click("#filters button[type=submit]")
    assert listed(page) == [world["hostile"].id]
    screenshot(page, "jobs-filtered")


def test_a_hostile_payload_is_shown_as_text(page: Page, world: dict[str, Any]) -> None:
    page.goto(world["url"] + f"/jobs/{world['hostile'].id}")
    expect(page.locator("#job-payload")).to_contain_text(HOSTILE)
    expect(page.locator("#job-error")).to_have_text(HOSTILE_ERROR)
    expect(page.locator("#job-key")).to_have_text(HOSTILE)
    assert page.locator("#job-payload script, #job-error img, #job-key script").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.goto(world["url"] + "/jobs?state=failed")
    expect(page.locator("#jobs")).to_contain_text(HOSTILE_ERROR)
    assert page.locator("#jobs img").count() == 0
    assert page.evaluate("window.__pwned") is None


def act(page: Page, button: str, outcome: str, reason: str | None = None) -> None:
    page.click(f"text={button}")
    expect(page.locator("h1")).to_contain_text("Confirm")
    if reason is not None:
        page.fill("input[name=reason]", reason)
    page.click("#confirm")
    expect(page.locator("#outcome")).to_contain_text(outcome)


def test_each_action_changes_the_database(
    page: Page, world: dict[str, Any], engine: Engine
) -> None:
    q = quote_schema(world["schema"])
    utils: WorkerUtils = world["utils"]

    def job(job_id: int) -> Any:
        rows = sql(engine, f"select * from {q}._private_jobs where id = :id", id=job_id)
        return rows[0] if rows else None

    later = utils.add_raw_job("digest", {}, JobSpec(run_at=None))
    sql(
        engine,
        f"update {q}._private_jobs set run_at = now() + interval '1 day' where id = :id",
        id=later.id,
    )
    page.goto(world["url"] + f"/jobs/{later.id}")
    expect(page.locator("#job-state")).to_have_text("scheduled")
    act(page, "Run now", "rescheduled to run now")
    assert sql(
        engine, f"select run_at <= now() from {q}._private_jobs where id = :id", id=later.id
    )[0][0]
    page.click(f"text=Back to job {later.id}")
    expect(page.locator("#job-state")).to_have_text("ready")

    act(page, "Fail", "failed permanently", reason="bad address")
    assert job(later.id).last_error == "bad address"
    assert job(later.id).attempts == job(later.id).max_attempts

    page.goto(world["url"] + f"/jobs/{world['mails'][0].id}")
    act(page, "Complete", "completed")
    assert job(world["mails"][0].id) is None

    page.goto(world["url"] + f"/jobs/{world['node_job_id']}")
    act(page, "Remove by key", "removed")
    assert job(world["node_job_id"]) is None

    stuck = world["stuck"].id
    page.goto(world["url"] + f"/jobs/{stuck}")
    expect(page.locator("#job-locked-by")).to_contain_text("py-stale")
    act(page, "Force-unlock its worker", "released")
    assert job(stuck).locked_by is None

    sql(
        engine,
        f"update {q}._private_jobs set locked_by = 'py-stale', locked_at = now() where id = :id",
        id=stuck,
    )
    page.goto(world["url"] + "/workers")
    act(page, "Sweep stale workers", "1 jobs recovered")
    assert job(stuck).locked_by is None
    assert not sql(engine, f"select 1 from {q}._sqla_graphile_workers where worker_id = 'py-stale'")
    # The Node pool's lock is left alone: it does not heartbeat, and is not 4 hours old.
    assert sql(engine, f"select 1 from {q}._private_jobs where locked_by = :p", p=world["pool_id"])
    screenshot(page, "action-done")


def test_confirmation_page(page: Page, world: dict[str, Any]) -> None:
    page.goto(world["url"] + f"/actions/complete?job_id={world['welcome'].id}")
    expect(page.locator("#confirm-description")).to_contain_text(f"job_id '{world['welcome'].id}'")
    screenshot(page, "confirm")
    page.click("text=Cancel")
    expect(page.locator("h1")).to_have_text("Overview")
