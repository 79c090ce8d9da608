"""The dashboard's job list on a million jobs: each page over HTTP, against 200 ms.

Fills a fresh worker schema with ``--jobs`` jobs (1,000,000 by default) in one
``INSERT ... SELECT generate_series`` (10 tasks, 10 queues, 1 % failed, 1 % locked,
10 % scheduled, 10 % keyed, 5 % with an error), then times the job list through the
dashboard's ASGI app (httpx's ASGI transport: routing, the query, the template): the
first page, deep pages by cursor, and each filter. Prints the median and p95 per page;
the target is a median under 200 ms. The exit status is 0 regardless.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx
from common import Schemas, database_url, parser, verdict, versions
from sqlalchemy import text

from sqla_graphile._urls import engine_from_url
from sqla_graphile.dashboard import create_app
from sqla_graphile.schema import quote_schema

TARGET_MS = 200.0


def fill(schemas: Schemas, schema: str, jobs: int) -> None:
    """``jobs`` jobs of mixed states, straight into the schema's tables."""
    q = quote_schema(schema)
    with schemas.engine.begin() as connection:
        connection.execute(
            text(
                f"insert into {q}._private_tasks (identifier)"
                " select 'task_' || n from generate_series(0, 9) n"
            )
        )
        connection.execute(
            text(
                f"insert into {q}._private_job_queues (queue_name)"
                " select 'queue_' || n from generate_series(0, 9) n"
            )
        )
        connection.execute(
            text(
                f"""
                insert into {q}._private_jobs (task_id, job_queue_id, payload, run_at,
                    attempts, max_attempts, last_error, key, locked_at, locked_by)
                select
                    (select min(id) from {q}._private_tasks) + g % 10,
                    case when g % 3 = 0
                        then (select min(id) from {q}._private_job_queues) + g % 10 end,
                    json_build_object('n', g),
                    now() + case when g % 10 = 1 then interval '1 day' else interval '0' end,
                    case when g % 100 = 2 then 25 else 0 end,
                    25,
                    case when g % 20 = 2 then 'error number ' || g end,
                    case when g % 10 = 3 then 'key-' || g end,
                    case when g % 100 = 4 then now() end,
                    case when g % 100 = 4 then 'bench-worker' end
                from generate_series(1, :jobs) g
                """
            ),
            {"jobs": jobs},
        )
    with schemas.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f"vacuum analyze {q}._private_jobs"))


async def measure(app: Any, path: str, repeats: int) -> list[float]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        response = await client.get(path)  # warm: the connection pool, the template
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            response = await client.get(path)
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def run(url: str, schema: str, jobs: int, repeats: int) -> list[dict[str, Any]]:
    app = create_app(url, schema=schema, sample_interval=None)
    middle, low = jobs // 2, max(100, jobs // 1000)
    pages = [
        ("first page", "/jobs"),
        ("deep page (cursor at the middle)", f"/jobs?before={middle}"),
        ("deep page (cursor near the oldest)", f"/jobs?before={low}"),
        ("state=ready", "/jobs?state=ready"),
        ("state=scheduled", "/jobs?state=scheduled"),
        ("state=locked (1 %)", "/jobs?state=locked"),
        ("state=failed (1 %)", "/jobs?state=failed"),
        ("task", "/jobs?task=task_3"),
        ("queue", "/jobs?queue=queue_7"),
        ("key (unique index)", f"/jobs?key=key-{middle - middle % 10 + 3}"),
        ("text in last_error (5 %)", "/jobs?text=ERROR+number"),
        ("text in last_error (one job: window scanned)", f"/jobs?text=number+{middle + 2}"),
        ("state=failed + task + queue", "/jobs?state=failed&task=task_2&queue=queue_2"),
        ("deep page, state=failed", f"/jobs?state=failed&before={middle}"),
    ]
    results = []
    for name, path in pages:
        times = await measure(app, path, repeats)
        results.append(
            {
                "page": name,
                "path": path,
                "median_ms": statistics.median(times),
                "p95_ms": p95(times),
            }
        )
    overview = await measure(app, "/", max(3, repeats // 4))
    results.append(
        {
            "page": "overview (for information: counts scan the table)",
            "path": "/",
            "median_ms": statistics.median(overview),
            "p95_ms": p95(overview),
            "information": True,
        }
    )
    return results


def main() -> None:
    options: argparse.ArgumentParser = parser(
        __doc__.splitlines()[0] if __doc__ else "",
        quick="100,000 jobs and 5 repeats instead of 1,000,000 and 20",
        repeats="requests timed per page (default 20)",
    )
    options.add_argument("--jobs", type=int, help="jobs in the schema (default 1,000,000)")
    args = options.parse_args()
    url = database_url(args, options)
    jobs = args.jobs or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (5 if args.quick else 20)
    engine = engine_from_url(url)
    schemas = Schemas(url, engine)
    try:
        print(json.dumps(versions(engine, None)))
        schema = schemas.fresh_schema("dashboard")
        start = time.perf_counter()
        fill(schemas, schema, jobs)
        print(f"filled {jobs:,} jobs in {time.perf_counter() - start:.1f} s")
        results = asyncio.run(run(schemas.conninfo, schema, jobs, repeats))
    finally:
        schemas.drop_schemas()
        engine.dispose()
    print(f"{'page':<48} {'median ms':>10} {'p95 ms':>8}  target {TARGET_MS:.0f} ms (median)")
    for result in results:
        mark = "info" if result.get("information") else verdict(result["median_ms"] < TARGET_MS)
        print(f"{result['page']:<48} {result['median_ms']:>10.1f} {result['p95_ms']:>8.1f}  {mark}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"jobs": jobs, "repeats": repeats, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
