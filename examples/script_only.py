"""No framework: migrate, enqueue inside a transaction, and run a worker until it is done.

DATABASE_URL=postgresql://user@localhost/mydb python examples/script_only.py

``GRAPHILE_WORKER_SCHEMA`` chooses the worker schema (default ``graphile_worker``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, insert, select
from sqlalchemy.engine import make_url

from sqla_graphile import JobSpec, TaskHandler, Worker, WorkerContext, WorkerUtils, migrate

metadata = MetaData()
signups = Table(
    "script_signups",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", Text, nullable=False),
    Column("welcomed", Text),
)


@dataclass
class SendWelcome(TaskHandler):
    """Welcome a new signup (and note it on the signup's row)."""

    IDENTIFIER: ClassVar[str] = "send_welcome"

    signup_id: int
    email: str

    def run(self, ctx: WorkerContext) -> None:
        """Send the welcome."""
        ctx.logger.info("welcoming %s", self.email)
        with ctx.utils.bind.begin() as connection:  # the worker's engine
            connection.execute(
                signups.update()
                .where(signups.c.id == self.signup_id)
                .values(welcomed=f"job {ctx.job.id}")
            )


def main(database_url: str, schema: str = "graphile_worker") -> list[tuple[str, str | None]]:
    """Migrate, add two signups and their jobs in one transaction, run a worker once."""
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    try:
        migrate(engine, schema=schema)  # the worker schema; a no-op when up to date
        metadata.create_all(engine)

        # The signups and their jobs commit together, or not at all.
        with engine.begin() as connection:
            jobs = WorkerUtils(connection, schema)
            for email in ["ada@example.com", "grace@example.com"]:
                signup_id = connection.execute(
                    insert(signups).values(email=email).returning(signups.c.id)
                ).scalar_one()
                jobs.add_job(
                    SendWelcome(signup_id=signup_id, email=email),
                    JobSpec(queue_name="welcome", max_attempts=5),
                )

        # Work until nothing is runnable, then return.
        Worker(engine, [SendWelcome], schema=schema).run_once()

        with engine.connect() as connection:
            rows = connection.execute(
                select(signups.c.email, signups.c.welcomed).order_by(signups.c.id)
            ).all()
        return [(email, welcomed) for email, welcomed in rows]
    finally:
        engine.dispose()


if __name__ == "__main__":
    schema = os.environ.get("GRAPHILE_WORKER_SCHEMA") or "graphile_worker"
    for email, welcomed in main(os.environ["DATABASE_URL"], schema):
        print(f"{email}: {welcomed or 'not yet'}")
