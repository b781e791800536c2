"""Who is asking: session cookie, bearer token or HTTP Basic; roles; CSRF; login throttling.

Why three ways in: a browser logs in once and carries a cookie; a machine (a
PACS posting STOW-RS, Prometheus) presents a bearer token; Orthanc's
DICOMweb client and many PACS only know HTTP Basic, where the password may
be the user's password or one of their API tokens. Every route but
``/healthz`` depends on ``viewer`` or ``admin`` below; the route-table test
checks that no route escaped.

CSRF: a cookie is sent by the browser on its own, so every state-changing
request that authenticates by cookie must also carry the session's CSRF
token (form field ``csrf`` or header ``X-CSRF-Token``); token and Basic
requests are not ambient and need none. The cookie is also SameSite=Strict.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import threading
import time
from collections import deque
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from storage.models import UserRole
from storage.users import Principal, authenticate, by_token, session_principal

__all__ = ["COOKIE", "LoginThrottle", "admin", "principal", "viewer"]

COOKIE = "ainode_session"
_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class LoginThrottle:
    """At most ``limit`` failed logins per user name and per client address in ``window_s``.

    In memory: the console is one process, and a restart forgetting the
    count costs an attacker a restart of the node, which they cannot cause.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = time.monotonic()
        with self._lock:
            waits = [q[0] + self.window_s - now for k in keys
                     if len(q := self._recent(k, now)) >= self.limit]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._fails.pop(k, None)


def _unauthorized(request: Request) -> HTTPException:
    if _wants_html(request):
        # A browser is sent to the login page instead of a bare 401.
        return HTTPException(401, "not logged in", headers={"Location": "/login"})
    return HTTPException(401, "authentication required",
                         headers={"WWW-Authenticate": 'Bearer realm="ainode"'})


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return not (path.startswith("/api/") or path.startswith("/dicomweb")
                or path in ("/metrics", "/readyz")) and "text/html" in request.headers.get(
                    "accept", "")


def _from_basic(request: Request, value: str) -> Principal | None:
    try:
        user, _, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    ctx = request.app.state.ctx
    throttle: LoginThrottle = request.app.state.throttle
    host = request.client.host if request.client else "?"
    if throttle.retry_after(f"user:{user}", f"host:{host}"):
        raise HTTPException(429, "too many failed logins; try again later")
    with ctx.db.session() as s:
        p = by_token(s, secret)
        if p is not None and p.username == user:
            return p
        p = authenticate(s, user, secret)
    if p is None:
        throttle.failed(f"user:{user}", f"host:{host}")
        ctx.audit_login(user, host, ok=False, via="basic")
    return p


async def _form_csrf(request: Request) -> None:
    """Read a form post's ``csrf`` field before ``principal`` checks it (Starlette caches
    the parsed form, so the route reads the same one)."""
    ctype = request.headers.get("content-type", "")
    if request.method in _UNSAFE and (ctype.startswith("application/x-www-form-urlencoded")
                                      or ctype.startswith("multipart/form-data")):
        form = await request.form()
        value = form.get("csrf")
        request.state.form_csrf = value if isinstance(value, str) else None


def principal(request: Request, _csrf: Annotated[None, Depends(_form_csrf)]) -> Principal:
    """The authenticated user of this request, or 401."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    ctx = request.app.state.ctx
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    found: Principal | None = None
    if scheme.lower() == "bearer" and value:
        with ctx.db.session() as s:
            found = by_token(s, value.strip())
    elif scheme.lower() == "basic" and value:
        found = _from_basic(request, value.strip())
    elif (cookie := request.cookies.get(COOKIE)):
        with ctx.db.session() as s:
            found = session_principal(s, cookie)
        if found is not None and request.method in _UNSAFE:
            sent = request.headers.get("x-csrf-token") or getattr(request.state, "form_csrf",
                                                                  None)
            if not sent or not found.csrf or not hmac.compare_digest(sent, found.csrf):
                raise HTTPException(403, "missing or wrong CSRF token")
    if found is None:
        raise _unauthorized(request)
    request.state.principal = found
    return found


def viewer(p: Annotated[Principal, Depends(principal)]) -> Principal:
    """Any logged-in user (viewer or admin)."""
    return p


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if p.role is not UserRole.ADMIN:
        raise HTTPException(403, "this needs the admin role")
    return p


Viewer = Annotated[Principal, Depends(viewer)]
Admin = Annotated[Principal, Depends(admin)]
