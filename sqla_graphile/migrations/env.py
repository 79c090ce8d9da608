"""Alembic environment of the packaged worker-schema revisions (standalone migrations)."""

from sqla_graphile.migrations.environment import run_standalone

run_standalone()
