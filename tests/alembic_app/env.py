"""An application's env.py, integrating the worker schema's revisions.

The worker schema name is taken from ``config.attributes["graphile_worker_schema"]``,
else ``-x graphile_worker_schema=...``, else ``graphile_worker``.
"""

import importlib.util
import os

from alembic import context
from sqlalchemy import create_engine, pool

from sqla_graphile._urls import normalize_url
from sqla_graphile.migrations import alembic_options


def _load_models():
    path = os.path.join(os.path.dirname(__file__), "models.py")
    spec = importlib.util.spec_from_file_location("alembic_app_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


metadata = _load_models().metadata
config = context.config
worker_schema = (
    config.attributes.get("graphile_worker_schema")
    or context.get_x_argument(as_dictionary=True).get("graphile_worker_schema")
    or "graphile_worker"
)
options = {
    "target_metadata": metadata,
    "include_schemas": True,
    **alembic_options(worker_schema),
}


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or os.environ["DATABASE_URL"],
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **options,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ["DATABASE_URL"]
    engine = create_engine(normalize_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
