"""Database URLs: ``postgres://`` and ``postgresql://`` mean psycopg 3 here.

Also the hiding of secrets: a URL can carry a password in its user info
(``user:pw@host``) or as a query option (``?password=...``, ``?sslpassword=...``), and
neither may reach a message, a log line or a traceback.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = [
    "MASK",
    "async_engine_from_url",
    "engine_from_url",
    "is_secret_option",
    "normalize_url",
    "redact",
    "redact_url",
    "url_secrets",
]

#: What a hidden secret is shown as.
MASK = "***"

# Query options holding a secret: libpq's password and sslpassword, and anything named
# like one (pwd, secret, token). passfile names a file, whose contents are never read.
_SECRET_OPTION = re.compile(r"pass(?!file)|pwd|secret|token", re.IGNORECASE)
# For a URL SQLAlchemy cannot parse: the user info's password, and query option values.
_RAW_PASSWORD = re.compile(r"^[^:/?#]*://[^/?#@:]*:([^/?#]*)@")
_RAW_OPTION = re.compile(r"[?&]([^=&#]*)=([^&#]*)")


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


def is_secret_option(name: str) -> bool:
    """Whether a URL query option of this name holds a secret (``password``, ``sslpassword``)."""
    return _SECRET_OPTION.search(name) is not None


def redact_url(url: str | URL) -> str:
    """Render ``url`` for messages and logs, with its password and secret options hidden."""
    try:
        parsed = normalize_url(url)
    except Exception:  # an unparsable URL is not echoed: it may hold a secret
        return "<unparsable database URL>"
    # A placeholder that survives the query's percent-encoding, swapped for the mask.
    placeholder = "REDACTED0SECRET"
    query = {
        name: placeholder if is_secret_option(name) else value
        for name, value in parsed.query.items()
    }
    rendered = parsed.set(query=query).render_as_string(hide_password=True)
    return rendered.replace(placeholder, MASK)


def url_secrets(url: str | URL | None) -> frozenset[str]:
    """Every form in which ``url``'s secrets could be printed: as typed and decoded."""
    if url is None:
        return frozenset()
    found: list[str] = []
    try:
        parsed = normalize_url(url)
    except Exception:
        parsed = None
    if parsed is not None:
        if parsed.password:
            found.append(str(parsed.password))
        for name, value in parsed.query.items():
            if is_secret_option(name):
                found.extend([value] if isinstance(value, str) else value)
    if isinstance(url, str):
        # As typed, and for a URL SQLAlchemy could not parse.
        match = _RAW_PASSWORD.match(url)
        if match:
            found.append(match.group(1))
        found.extend(value for name, value in _RAW_OPTION.findall(url) if is_secret_option(name))
    forms: set[str] = set()
    for secret in found:
        for decoded in {secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)}:
            forms.update(
                {
                    decoded,
                    urllib.parse.quote(decoded, safe=""),
                    urllib.parse.quote(decoded),
                    urllib.parse.quote_plus(decoded),
                }
            )
    return frozenset(form for form in forms if form)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of ``secrets`` replaced by :data:`MASK`."""
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: no partial leaks
        text = text.replace(secret, MASK)
    return text


def engine_from_url(url: str | URL, **kw: Any) -> Engine:
    """A sync :class:`~sqlalchemy.Engine` for ``url`` (psycopg 3 by default)."""
    return create_engine(normalize_url(url), **kw)


def async_engine_from_url(url: str | URL, **kw: Any) -> AsyncEngine:
    """An :class:`~sqlalchemy.ext.asyncio.AsyncEngine` for ``url`` (psycopg 3 by default)."""
    return create_async_engine(normalize_url(url, is_async=True), **kw)
