"""Mixed fleets on a schema Node migrated and on one we migrated: no difference.

Node migrates one schema (its ``makeWorkerUtils`` does, on first use); our revisions the
other. Node started on ours applies nothing; ours on Node's adds only our registry
revision. Then both schemas serve a Node worker and ours, each enqueueing for the other,
with the same outcome.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from interop_fixtures import NodeProcess, log_rows, make_log, recording_task
from migration_fixtures import (
    EXPECTED_LEDGER,
    Listener,
    catalog_snapshot,
    ledger,
    migrate_payload,
    our_heads,
)
from sqlalchemy import Engine, text
from worker_fixtures import await_for, rows, running

from sqla_graphile import JobSpec, Worker, WorkerUtils, migrate
from sqla_graphile.schema import quote_schema

pytestmark = pytest.mark.node

# What our registry revision adds to a schema, and nothing else.
OUR_RELATIONS = {
    "_sqla_graphile_workers",
    "_sqla_graphile_workers_pkey",
    "_sqla_graphile_workers_heartbeat_idx",
    "alembic_version",
    "alembic_version_pkc",
}


def relations(engine: Engine, schema: str) -> set[str]:
    with engine.connect() as connection:
        return set(
            connection.scalars(
                text("select relname from pg_class where relnamespace = cast(:s as regnamespace)"),
                {"s": quote_schema(schema)},
            )
        )


async def serve_both_ways(node: NodeProcess, engine: Engine, schema: str) -> list[tuple[Any, ...]]:
    """Run a Node pool and our worker on ``schema``, each side enqueueing for the other."""
    log = make_log(engine, schema)
    worker = Worker(engine, [recording_task("for_python", log)], schema=schema, poll_interval=0.1)
    name = f"serve-{schema}"
    async with running(worker):
        await node.astart_pool(name, schema, {"for_node": {"log": log}}, concurrency=2)
        try:
            WorkerUtils(engine, schema).add_raw_job("for_node", {"to": "node", "n": 1})
            WorkerUtils(engine, schema).add_raw_job(
                "for_node", {"to": "node", "n": 2}, JobSpec(queue_name="nq", flags=["f"])
            )
            await node.acall(
                "addJob", schema=schema, identifier="for_python", payload={"to": "python", "n": 1}
            )
            await node.acall(
                "addJob",
                schema=schema,
                identifier="for_python",
                payload={"to": "python", "n": 2},
                spec={"queueName": "pq", "priority": 2},
            )
            await await_for(
                lambda: len(log_rows(engine, log)) == 4 and not rows(engine, schema),
                what=f"both sides to run every job on {schema}",
            )
        finally:
            await node.acall("stop", name=name)
    return sorted(
        (
            r["who"],
            r["task"],
            r["queue_name"] or "",
            r["job"]["payload"]["to"],
            r["job"]["payload"]["n"],
            r["job"]["priority"],
            r["job"]["attempts"],
        )
        for r in log_rows(engine, log)
    )


async def test_node_and_our_migrations_serve_both_sides_alike(
    node: NodeProcess,
    engine: Engine,
    schema: str,
    listener: Listener,
) -> None:
    ours = schema
    theirs = f"gwnode_{secrets.token_hex(4)}"
    try:
        # Node migrates its schema (the listener hears it, so it would hear us too).
        await node.acall("query", schema=theirs, sql="select 1")
        assert listener.received() == [migrate_payload(n) for n in range(1, 21)]
        assert ledger(engine, theirs) == EXPECTED_LEDGER

        # Node starting a worker pool on our schema applies nothing.
        before_ours = catalog_snapshot(engine, ours)
        relations_ours = relations(engine, ours)
        await node.astart_pool("on-ours", ours, {"for_node": {}})
        await node.acall("stop", name="on-ours")
        assert catalog_snapshot(engine, ours) == before_ours
        assert relations(engine, ours) == relations_ours
        assert listener.received() == []

        # Our migrate on Node's schema adds our registry revision, nothing of Graphile's.
        before_theirs = catalog_snapshot(engine, theirs)
        relations_theirs = relations(engine, theirs)
        migrate(engine, schema=theirs)
        assert catalog_snapshot(engine, theirs) == before_theirs
        assert ledger(engine, theirs) == EXPECTED_LEDGER
        assert relations(engine, theirs) - relations_theirs == OUR_RELATIONS
        assert relations_theirs.isdisjoint(OUR_RELATIONS)
        assert listener.received() == []
        with engine.connect() as connection:
            versions = connection.scalars(
                text(f"select version_num from {quote_schema(theirs)}.alembic_version")
            ).all()
        assert sorted(versions) == sorted(our_heads())
        # Both schemas now hold the same objects.
        assert relations(engine, theirs) == relations(engine, ours)

        # Both serve a mixed fleet the same way.
        on_ours = await serve_both_ways(node, engine, ours)
        on_theirs = await serve_both_ways(node, engine, theirs)
        assert on_ours == on_theirs
        assert [r[:2] for r in on_ours] == [("node", "for_node")] * 2 + [
            ("python", "for_python")
        ] * 2
        assert ledger(engine, ours) == ledger(engine, theirs) == EXPECTED_LEDGER
        assert listener.received() == []
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"drop schema if exists {quote_schema(theirs)} cascade"))
