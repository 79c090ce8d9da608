"""Who may look and act: the authentication hook, CSRF tokens, the audit log, headers.

* The hook (``authenticate``) is given each request and returns the operator's name, or
  ``None`` to refuse it (``403``); it may raise Starlette's ``HTTPException`` for another
  answer (``401`` with a ``WWW-Authenticate`` header, say). Without a hook every visitor
  is let in, named after their address.
* CSRF: a double-submit cookie. The cookie holds a random nonce; each form carries the
  HMAC of that nonce under the app's secret key. A cross-site form can neither read the
  cookie nor forge the HMAC; ``SameSite=Strict`` keeps the cookie off cross-site posts.
* Every action, done or refused by the database, is one line on the
  ``sqla_graphile.dashboard.audit`` logger, naming the operator.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "SECURITY_HEADERS",
    "Authenticate",
    "Csrf",
    "audit_logger",
    "operator_of",
]

#: The hook: a request in, the operator's name out (``None``: refused). May be async.
Authenticate = Callable[[Request], "str | Awaitable[str | None] | None"]

CSRF_COOKIE = "gw_dashboard_csrf"
CSRF_FIELD = "csrf_token"

#: No script may run at all (the pages have none); forms post to this origin only.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

audit_logger = logging.getLogger("sqla_graphile.dashboard.audit")


async def operator_of(request: Request, authenticate: Authenticate | None) -> str | None:
    """The operator's name by the hook, or ``anonymous@<address>`` without one."""
    if authenticate is None:
        client = request.client
        return f"anonymous@{client.host if client else 'unknown'}"
    found: Any = authenticate(request)
    if inspect.isawaitable(found):
        found = await found
    if found is None:
        return None
    return str(found)


class Csrf:
    """Issues and checks the double-submit tokens of one app (one secret key)."""

    def __init__(self, secret_key: bytes | str | None) -> None:
        if isinstance(secret_key, str):
            secret_key = secret_key.encode()
        # A key of its own per app unless given: several processes behind one address
        # must share one (``secret_key=``), or a form from one fails on another.
        self._key = secret_key or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def token(self, request: Request) -> tuple[str, str | None]:
        """The form token for ``request``, and a new nonce to set as the cookie (or ``None``)."""
        nonce = request.cookies.get(CSRF_COOKIE)
        fresh = None
        if not nonce or len(nonce) > 128:
            nonce = fresh = secrets.token_urlsafe(32)
        return self._sign(nonce), fresh

    def set_cookie(self, request: Request, response: Response, nonce: str) -> None:
        """Send the nonce, for this app's path only."""
        path = request.scope.get("root_path") or "/"
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            path=path,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def valid(self, request: Request, submitted: str | None) -> bool:
        """Whether ``submitted`` is the HMAC of the request's cookie nonce."""
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or not submitted:
            return False
        return hmac.compare_digest(self._sign(nonce), submitted)
