"""Local users of the web console and API: argon2 password hashes, roles, sessions, tokens.

Why here and not in node/web: ``ainode users`` (the CLI) and the web server
are two front doors to the same rows, and both must hash, verify and audit
the same way. Secrets (passwords, session cookies, API tokens) are never
stored or logged: passwords as argon2id hashes (argon2-cffi), session and
API tokens as SHA-256 of 32 random bytes, which is enough for a secret
with that much entropy and cheap enough to check on every request.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.audit import audit
from storage.errors import ConflictError, InputError
from storage.models import ApiToken, User, UserRole, WebSession, utcnow

__all__ = [
    "Principal",
    "add_user",
    "authenticate",
    "by_token",
    "create_session",
    "create_token",
    "end_session",
    "generate_password",
    "list_users",
    "remove_user",
    "reset_password",
    "session_principal",
]

_HASHER = PasswordHasher()
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as; ``csrf`` is set for a browser session (cookie) only."""

    user_id: int
    username: str
    role: UserRole
    via: str  # "session", "token" or "password"
    csrf: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_password() -> str:
    """A random password for a first admin (about 120 bits, URL-safe)."""
    return secrets.token_urlsafe(15)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InputError(f"a password has at least {MIN_PASSWORD} characters")


def _get(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise InputError(f"no user named {username!r}")
    return user


def add_user(session: Session, username: str, password: str, role: UserRole, *,
             actor: str) -> User:
    if not _USERNAME.match(username):
        raise InputError("a user name is 1-64 letters, digits or _ . @ -")
    _check_password(password)
    if session.scalars(select(User).where(User.username == username)).one_or_none():
        raise ConflictError(f"user {username!r} already exists")
    user = User(username=username, password_hash=_HASHER.hash(password), role=role)
    session.add(user)
    session.flush()
    audit(session, "user.added", actor=actor, user=username, role=role.value)
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def remove_user(session: Session, username: str, *, actor: str) -> None:
    user = _get(session, username)
    session.delete(user)
    audit(session, "user.removed", actor=actor, user=username)


def reset_password(session: Session, username: str, password: str, *, actor: str) -> None:
    """New password; every session of the user ends (a reset is often a lock-out)."""
    _check_password(password)
    user = _get(session, username)
    user.password_hash = _HASHER.hash(password)
    user.password_changed_at = utcnow()
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    audit(session, "user.password_reset", actor=actor, user=username)


def authenticate(session: Session, username: str, password: str) -> Principal | None:
    """The user when the password matches, else None (the caller audits and throttles)."""
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        # Spend the same time as a wrong password, so names cannot be probed by timing.
        with contextlib.suppress(VerificationError):
            _HASHER.verify(_DUMMY_HASH, password)
        return None
    try:
        _HASHER.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    return Principal(user.id, user.username, user.role, "password")


_DUMMY_HASH = _HASHER.hash("not a password of anyone")


def create_session(session: Session, user_id: int, lifetime: timedelta) -> tuple[str, str]:
    """(cookie token, CSRF token) of a new browser session; only the hash is stored."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    session.add(WebSession(token_sha256=_sha(token), user_id=user_id, csrf_token=csrf,
                           created_at=now, expires_at=now + lifetime))
    return token, csrf


def session_principal(session: Session, token: str) -> Principal | None:
    row = session.execute(
        select(WebSession, User).join(User, WebSession.user_id == User.id)
        .where(WebSession.token_sha256 == _sha(token))).first()
    if row is None:
        return None
    ws, user = row
    if ws.expires_at <= utcnow():
        return None
    return Principal(user.id, user.username, user.role, "session", csrf=ws.csrf_token)


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_sha256 == _sha(token)))


def create_token(session: Session, username: str, name: str, *, actor: str) -> str:
    """A new API token for ``username``; the secret is shown once and never stored."""
    user = _get(session, username)
    token = "ain_" + secrets.token_urlsafe(32)
    session.add(ApiToken(token_sha256=_sha(token), user_id=user.id, name=name[:64]))
    audit(session, "user.token_created", actor=actor, user=username, token_name=name[:64])
    return token


def by_token(session: Session, token: str) -> Principal | None:
    row = session.execute(
        select(ApiToken, User).join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == _sha(token))).first()
    if row is None:
        return None
    tok, user = row
    tok.last_used_at = utcnow()
    return Principal(user.id, user.username, user.role, "token")
