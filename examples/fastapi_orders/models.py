"""The service's database: one ``orders`` table, its engine and its settings."""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy import DateTime, Engine, Integer, String, create_engine, func
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqla_graphile import DEFAULT_SCHEMA


class Base(DeclarativeBase):
    """The service's declarative base."""


class Order(Base):
    """An order; ``confirmation_sent_at`` is set by its email job."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    item: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    confirmation_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def engine_for(database_url: str) -> Engine:
    """An engine on psycopg 3 (SQLAlchemy picks psycopg2 for a bare ``postgresql://``)."""
    url = make_url(database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url)


def settings(database_url: str | None = None, schema: str | None = None) -> tuple[str, str]:
    """The database URL and worker schema: as given, else from the environment.

    ``DATABASE_URL`` and ``GRAPHILE_WORKER_SCHEMA`` (default ``graphile_worker``), the
    variables the ``graphile-worker`` command reads too, so the app, its worker and the
    command line agree.
    """
    url = database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("set DATABASE_URL, e.g. postgresql://user@localhost/mydb")
    return url, schema or os.environ.get("GRAPHILE_WORKER_SCHEMA") or DEFAULT_SCHEMA
