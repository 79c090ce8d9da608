"""Database URLs: ``postgres://`` and ``postgresql://`` mean psycopg 3 here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["async_engine_from_url", "engine_from_url", "normalize_url", "redact_url"]


def normalize_url(url: str | URL, *, is_async: bool = False) -> URL:
    """Parse ``url``, choosing psycopg 3 when it names no driver.

    SQLAlchemy's default PostgreSQL driver is psycopg2; this library depends on psycopg 3
    only, so a bare ``postgresql://`` (or Heroku-style ``postgres://``) URL gets psycopg.
    A URL that names its driver (``postgresql+asyncpg://``) is left as it is.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(
            drivername="postgresql+psycopg_async" if is_async else "postgresql+psycopg"
        )
    return parsed


def redact_url(url: str | URL) -> str:
    """Render ``url`` for messages and logs, with any password hidden."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is not echoed: it may hold a secret
        return "<unparsable database URL>"


def engine_from_url(url: str | URL, **kw: Any) -> Engine:
    """A sync :class:`~sqlalchemy.Engine` for ``url`` (psycopg 3 by default)."""
    return create_engine(normalize_url(url), **kw)


def async_engine_from_url(url: str | URL, **kw: Any) -> AsyncEngine:
    """An :class:`~sqlalchemy.ext.asyncio.AsyncEngine` for ``url`` (psycopg 3 by default)."""
    return create_async_engine(normalize_url(url, is_async=True), **kw)
