"""sqla-graphile's worker registry (heartbeats for crash recovery).

One row per running worker process that has recovery enabled: its id (the value it
writes to ``locked_by``), start time, last heartbeat and metadata (pid, host, tasks,
library version). It lives in the worker schema under a name Node never uses, and it is
**not** recorded in Graphile's ledger ``<schema>.migrations``: Node workers neither see
nor need it.

Downgrade drops the table (workers running with recovery then fail their heartbeats).

Revision ID: graphile_worker_0002
Revises: graphile_worker_0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from sqla_graphile.migrations import current_schema
from sqla_graphile.schema import literal_sql, quote_schema

revision: str = "graphile_worker_0002"
down_revision: str | Sequence[str] | None = "graphile_worker_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = [
    """
create table if not exists @S._sqla_graphile_workers (
  worker_id text not null,
  started_at timestamptz default now() not null,
  last_heartbeat_at timestamptz default now() not null,
  metadata jsonb,
  constraint _sqla_graphile_workers_pkey primary key (worker_id)
)
""",
    """
create index if not exists _sqla_graphile_workers_heartbeat_idx
  on @S._sqla_graphile_workers (last_heartbeat_at)
""",
    "alter table @S._sqla_graphile_workers enable row level security",
]


def upgrade() -> None:
    quoted = quote_schema(current_schema())
    for statement in UPGRADE:
        # Colons are escaped so that text() reads none in the schema name as a parameter.
        op.execute(text(statement.replace("@S", quoted).replace(":", "\\:")))


def downgrade() -> None:
    quoted = quote_schema(current_schema())
    op.execute(literal_sql(f"drop table if exists {quoted}._sqla_graphile_workers"))
