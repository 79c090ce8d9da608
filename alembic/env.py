"""The repository's Alembic environment: the same runner as the packaged one."""

from sqla_graphile.migrations.environment import run_standalone

run_standalone()
