"""Alembic migrations, run from code so ``ainode db upgrade`` needs no alembic.ini."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError

from storage.db import Database
from storage.errors import StorageError

__all__ = ["alembic_config", "current_revision", "db_reason", "downgrade", "ensure_schema",
           "head_revision",
           "upgrade", "wait_until_reachable"]

MIGRATIONS = Path(__file__).with_name("migrations")
_log = logging.getLogger(__name__)


def alembic_config(db: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config interpolates %; escape it in passwords.
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    cfg.attributes["engine"] = db.engine
    return cfg


def upgrade(db: Database, revision: str = "head") -> str:
    """Bring the schema to ``revision``; returns the revision now in force."""
    try:
        command.upgrade(alembic_config(db), revision)
    except SQLAlchemyError as exc:
        raise StorageError(f"migration failed on {db.safe_url}: {db_reason(exc)}") from exc
    return current_revision(db) or ""


def downgrade(db: Database, revision: str) -> str | None:
    """Take the schema back to ``revision`` (a rollback to an older release)."""
    try:
        command.downgrade(alembic_config(db), revision)
    except SQLAlchemyError as exc:
        raise StorageError(f"downgrade failed on {db.safe_url}: {db_reason(exc)}") from exc
    except CommandError as exc:
        raise StorageError(f"cannot downgrade to {revision!r}: {exc}") from exc
    return current_revision(db)


def current_revision(db: Database) -> str | None:
    """The revision in force; StorageError in one line when the database cannot be reached."""
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot reach database {db.safe_url}: {db_reason(exc)}") from exc


def db_reason(exc: BaseException) -> str:
    """The driver's own first line (``connection refused``...), without SQLAlchemy's trailer.

    Why: a one-line message is what the admin reads; the DBAPI's text says what
    failed, the rest (SQL, a link to SQLAlchemy's error page) does not help.
    """
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    # SQLAlchemy appends "[SQL: ...]" and "(Background on this error at: ...)".
    lines = [ln for ln in lines if not ln.startswith(("[SQL", "[parameters", "(Background"))]
    text = lines[0] if lines else type(orig).__name__
    return " ".join(text.split())


def ensure_schema(db: Database) -> str | None:
    """Create the schema on an empty database; returns the revision created, else None.

    A database at an older revision is not migrated behind the admin's back
    (another node version may share it): StorageError naming ``ainode db upgrade``.
    """
    rev = current_revision(db)
    head = head_revision()
    if rev == head:
        return None
    if rev is None:
        return upgrade(db)
    try:
        ScriptDirectory(str(MIGRATIONS)).get_revision(rev)
    except CommandError:
        raise StorageError(f"database {db.safe_url} is at schema revision {rev}, which this "
                           f"ainode does not know (it knows up to {head}): a newer release "
                           "migrated it; run the same release on every host") from None
    raise StorageError(f"database {db.safe_url} is at schema revision {rev}, this ainode needs "
                       f"{head}: run `ainode db upgrade`")


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def wait_until_reachable(db: Database, timeout_s: float, *,
                         sleep: Callable[[float], None] = time.sleep,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Retry connecting with backoff (1, 2, 4 ... at most 15 s) until ``timeout_s`` passed.

    Why at start-up only: a node booted with its database server (one systemd
    target, a power cut) must not die because PostgreSQL is a few seconds
    slower; once running, each task retries on its own tick. Gives up with the
    one-line StorageError of the last attempt.
    """
    deadline = clock() + timeout_s
    delay = 1.0
    while True:
        try:
            current_revision(db)
            return
        except StorageError as exc:
            left = deadline - clock()
            if left <= 0:
                raise StorageError(f"{exc} (gave up after {timeout_s:g} s; "
                                   "storage.database_wait_s sets how long)") from exc
            _log.warning("database not reachable yet; retrying",
                         extra={"database": db.safe_url, "retry_in_s": round(min(delay, left), 1),
                                "error": str(exc)})
            sleep(min(delay, left))
            delay = min(delay * 2, 15.0)
