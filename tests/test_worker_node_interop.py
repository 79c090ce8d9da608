"""Python and Node workers share one named queue and never run two of its jobs at once."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from worker_fixtures import await_for, execute, rows, running, utils_fixture  # noqa: F401

from sqla_graphile import JobSpec, RawJobSpec, Worker, WorkerContext, WorkerUtils, task
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

# Both sides stamp start and end with the database's clock_timestamp(), in microseconds.
NODE_TASK = """
module.exports = async (payload, helpers) => {
  await helpers.query(%(insert)s, [helpers.job.id, payload.q]);
  await new Promise((resolve) => setTimeout(resolve, 30));
  await helpers.query(%(update)s, [helpers.job.id]);
};
"""


async def test_named_queue_shared_with_a_node_worker(
    node_dir: Path,
    database_url: str,
    engine: Engine,
    schema: str,
    utils: WorkerUtils,
    tmp_path: Path,
) -> None:
    table = f"{quote_schema(schema)}.test_intervals"
    execute(
        engine,
        f"create table {table} (job_id bigint, queue text, who text, "
        "started timestamptz, ended timestamptz)",
    )

    @task("timed")
    async def timed(payload: Any, ctx: WorkerContext) -> None:
        assert ctx.async_utils is not None
        engine = ctx.async_utils.bind
        async with engine.begin() as connection:  # type: ignore[union-attr]
            await connection.execute(
                text(
                    f"insert into {table} (job_id, queue, who, started) "
                    "values (:id, :q, 'python', clock_timestamp())"
                ),
                {"id": ctx.job.id, "q": payload["q"]},
            )
        await asyncio.sleep(0.03)
        async with engine.begin() as connection:  # type: ignore[union-attr]
            await connection.execute(
                text(
                    f"update {table} set ended = clock_timestamp() "
                    "where job_id = :id and ended is null"
                ),
                {"id": ctx.job.id},
            )

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "timed.js").write_text(
        NODE_TASK
        % {
            "insert": json.dumps(
                f"insert into {table} (job_id, queue, who, started) "
                "values ($1, $2, 'node', clock_timestamp())"
            ),
            "update": json.dumps(
                f"update {table} set ended = clock_timestamp() where job_id = $1 and ended is null"
            ),
        }
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHILE_WORKER")}
    env.pop("DATABASE_URL", None)
    jobs = utils.add_raw_jobs(
        [
            RawJobSpec("timed", {"q": f"q{n % 2}"}, JobSpec(queue_name=f"q{n % 2}"))
            for n in range(60)
        ]
    )
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen(
        [
            str(node_dir / "node_modules" / ".bin" / "graphile-worker"),
            "--connection",
            database_url,
            "--schema",
            schema,
            "--jobs",
            "4",
            "--poll-interval",
            "20",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Node starts slower than we do: let it take the first job, then join it.
        await await_for(
            lambda: execute(engine, f"select 1 from {table} where who = 'node'"),
            timeout=60,
            what="Node's first job (see node.log)",
        )
        worker = Worker(engine, [timed], schema=schema, concurrency=4, poll_interval=0.02)
        async with running(worker):
            await await_for(
                lambda: execute(engine, f"select count(ended) as n from {table}")[0]["n"] >= 60,
                timeout=90,
                what="all jobs",
            )
            await await_for(lambda: not rows(engine, schema), what="all completions")
    finally:
        node.terminate()
        node.wait(30)
        log.close()

    recorded = execute(engine, f"select * from {table} order by started")
    assert sorted(r["job_id"] for r in recorded) == sorted(j.id for j in jobs)
    assert {r["who"] for r in recorded} == {"node", "python"}, "both workers should take part"
    for queue in ("q0", "q1"):
        spans = [(r["started"], r["ended"]) for r in recorded if r["queue"] == queue]
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"two jobs of {queue} overlapped"
