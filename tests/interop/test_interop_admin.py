"""Mixed fleets, administration: our WorkerUtils on Node's jobs acts as Node's workerUtils.

Node creates the same jobs in two schemas. The same sequence of admin calls then runs
through Node's ``workerUtils`` on one and through our ``WorkerUtils`` on the other; what
each call returns and the rows after each call must match. (Node 0.18's workerUtils has
no ``removeJob``; Node applications call the SQL ``remove_job``, as done here.)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from interop_fixtures import NodeProcess
from sqlalchemy import Engine, text

from sqla_graphile import CleanupTask, RescheduleJobOptions, WorkerUtils, migrate
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

RUN_AT = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone.utc)
NEW_RUN_AT = datetime(2031, 6, 7, 8, 9, 10, 123_000, tzinfo=timezone.utc)

# (identifier, payload, spec) of the jobs Node creates, in order: ids 1 to 9.
JOBS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("t_a", {"n": 1}, {}),
    ("t_a", {"n": 2}, {"queueName": "qa"}),
    ("t_b", {"n": 3}, {"jobKey": "k3", "flags": ["f"]}),
    ("t_a", {"n": 4}, {"queueName": "qb", "priority": 1}),
    ("t_b", {"n": 5}, {}),
    ("t_c", {"n": 6}, {"jobKey": "k6", "queueName": "qc"}),
    ("t_a", {"n": 7}, {"jobKey": "k7"}),
    ("t_d", {"n": 8}, {"queueName": "qd"}),
    ("t_a", {"n": 9}, {"maxAttempts": 1}),
]


def state(engine: Engine, schema: str) -> dict[str, Any]:
    """Every row of the schema, timestamps reduced to what does not depend on the clock."""
    q = quote_schema(schema)
    with engine.connect() as connection:
        jobs = [
            {
                **{k: v for k, v in row.items() if k not in ("created_at", "updated_at")},
                "locked_at": row["locked_at"] is not None,
                "touched": row["updated_at"] != row["created_at"],
            }
            for row in connection.execute(
                text(
                    f"select j.*, t.identifier, q.queue_name from {q}._private_jobs j"
                    f" join {q}._private_tasks t on t.id = j.task_id"
                    f" left join {q}._private_job_queues q on q.id = j.job_queue_id"
                    " order by j.id"
                )
            ).mappings()
        ]
        queues = connection.execute(
            text(f"select queue_name, locked_by from {q}._private_job_queues order by 1")
        ).all()
        tasks = connection.scalars(
            text(f"select identifier from {q}._private_tasks order by 1")
        ).all()
    return {"jobs": jobs, "queues": [tuple(r) for r in queues], "tasks": list(tasks)}


def summary(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Returned rows (Node's dicts or our Jobs): id, attempts, max_attempts, key, error."""
    out = []
    for row in rows:
        get: Callable[[str], Any] = (
            row.get if isinstance(row, dict) else lambda name, r=row: getattr(r, name)
        )
        out.append(
            (
                int(get("id")),
                get("attempts"),
                get("max_attempts"),
                get("key"),
                get("last_error"),
                get("priority"),
            )
        )
    return sorted(out)


async def test_our_admin_calls_on_node_jobs_match_nodes_worker_utils(
    node: NodeProcess, engine: Engine, schema: str
) -> None:
    theirs = f"gw_{secrets.token_hex(4)}"
    migrate(engine, schema=theirs)
    try:
        for target in (theirs, schema):
            for identifier, payload, spec in JOBS:
                await node.acall(
                    "addJob",
                    schema=target,
                    identifier=identifier,
                    payload=payload,
                    spec={"runAt": RUN_AT.isoformat(), **spec},
                )
            # Job 7 is running somewhere (locked by a live worker).
            with engine.begin() as connection:
                connection.execute(
                    text(
                        f"update {quote_schema(target)}._private_jobs set locked_at = now(),"
                        " locked_by = 'pool-elsewhere', attempts = 1 where id = 7"
                    )
                )
        assert state(engine, theirs) == state(engine, schema)
        ours = WorkerUtils(engine, schema, known_identifiers={"t_c"})

        async def node_call(op: str, *args: Any) -> Any:
            return await node.acall(op, schema=theirs, args=list(args))

        async def node_remove(key: str) -> list[Any]:
            found = await node.acall(
                "query",
                schema=theirs,
                sql=f"select * from {quote_schema(theirs)}.remove_job($1) where id is not null",
                values=[key],
            )
            return list(found)

        def our_remove(key: str) -> list[Any]:
            found = ours.remove_job(key)
            return [] if found is None else [found]

        steps: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
            (
                "complete",
                lambda: node_call("completeJobs", [1, 8, 7]),
                lambda: ours.complete_jobs([1, 8, 7]),
            ),
            (
                "fail with a reason",
                lambda: node_call("permanentlyFailJobs", [2, 7], "manual reason"),
                lambda: ours.permanently_fail_jobs([2, 7], "manual reason"),
            ),
            (
                "fail without one",
                lambda: node_call("permanentlyFailJobs", [3, 9]),
                lambda: ours.permanently_fail_jobs([3, 9]),
            ),
            (
                "reschedule",
                lambda: node_call(
                    "rescheduleJobs",
                    [4, 5, 7],
                    {
                        "runAt": NEW_RUN_AT.isoformat(),
                        "priority": 5,
                        "attempts": 2,
                        "maxAttempts": 7,
                    },
                ),
                lambda: ours.reschedule_jobs(
                    [4, 5, 7],
                    RescheduleJobOptions(run_at=NEW_RUN_AT, priority=5, attempts=2, max_attempts=7),
                ),
            ),
            ("remove a waiting job", lambda: node_remove("k6"), lambda: our_remove("k6")),
            ("remove a running job", lambda: node_remove("k7"), lambda: our_remove("k7")),
            ("remove a missing key", lambda: node_remove("nope"), lambda: our_remove("nope")),
            (
                "delete permanently failed jobs",
                lambda: node_call("cleanup", {"tasks": ["DELETE_PERMAFAILED_JOBS"]}),
                lambda: ours.cleanup([CleanupTask.DELETE_PERMANENTLY_FAILED_JOBS]),
            ),
            (
                "gc job queues",
                lambda: node_call("cleanup", {"tasks": ["GC_JOB_QUEUES"]}),
                lambda: ours.cleanup([CleanupTask.GC_JOB_QUEUES]),
            ),
            (
                "gc task identifiers",
                lambda: node_call(
                    "cleanup", {"tasks": ["GC_TASK_IDENTIFIERS"], "taskIdentifiersToKeep": ["t_c"]}
                ),
                lambda: ours.cleanup([CleanupTask.GC_TASK_IDENTIFIERS]),
            ),
        ]
        returned = {}
        for name, by_node, by_us in steps:
            node_result = await by_node()
            our_result = by_us()
            if node_result is not None:
                assert summary(our_result) == summary(node_result), name
                returned[name] = summary(node_result)
            assert state(engine, schema) == state(engine, theirs), f"rows differ after: {name}"

        # The sequence did what it names (so the comparison is not between two no-ops).
        assert [r[0] for r in returned["complete"]] == [1, 8]
        assert returned["fail with a reason"] == [(2, 25, 25, None, "manual reason", 0)]
        assert [r[4] for r in returned["fail without one"]] == ["Manually marked as failed"] * 2
        assert returned["reschedule"] == [(4, 2, 7, None, None, 5), (5, 2, 7, None, None, 5)]
        assert [r[0] for r in returned["remove a waiting job"]] == [6]
        assert returned["remove a running job"] == [(7, 25, 25, None, None, 0)]
        assert returned["remove a missing key"] == []
        final = state(engine, schema)
        assert [(j["id"], j["run_at"]) for j in final["jobs"]] == [
            (4, NEW_RUN_AT),
            (5, NEW_RUN_AT),
            (7, RUN_AT),
        ]
        assert final["queues"] == [("qb", None)]
        assert final["tasks"] == ["t_a", "t_b", "t_c"]
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"drop schema if exists {quote_schema(theirs)} cascade"))
