"""The service's database: one ``orders`` table, and its engine."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Engine, Integer, String, create_engine, func
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
