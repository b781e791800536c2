"""Start-up recovery: rows committed for files that an unclean stop left incomplete.

Why it exists: a row commits while its file's fsync still runs (the two waits
overlap), so after a power cut a row can name a file that never became
durable; such an instance was never acknowledged and its row must go.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from storage.audit import audit
from storage.db import Database
from storage.errors import StorageError
from storage.filestore import FileStore
from storage.models import Instance, Series

__all__ = ["remove_rows", "sweep_unrecorded", "verify_recent"]

log = logging.getLogger(__name__)


def remove_rows(session: Any, rows: Sequence[tuple[int, int, int]]) -> None:
    """Delete instance rows and take them off their series' counters."""
    for instance_id, series_id, size in rows:
        session.execute(delete(Instance).where(Instance.id == instance_id))
        session.execute(update(Series).where(Series.id == series_id).values(
            instance_count=Series.instance_count - 1, size_bytes=Series.size_bytes - size))


def verify_recent(db: Database, store: FileStore, window_s: float = 10.0) -> list[str]:
    """At start-up: check the files of the instances received last before the stop.

    A row is committed while its file's fsync is still running (see
    ``Ingestor._record``); after a power cut in that moment the row can name
    a file that is missing or incomplete. Such an instance was never
    acknowledged (acknowledgement waits for both), so its row is removed and
    audited and the sender's retry stores it afresh. Only the rows of the
    last ``window_s`` seconds before the newest one are read back: the fsync
    runs alongside the commit and ends milliseconds after it, so older rows'
    files were durable before the stop (and re-reading minutes of a busy
    node's traffic would hold up its start). Returns the SOP Instance UIDs removed.
    """
    removed: list[str] = []
    with db.session() as s:
        newest = s.scalar(select(func.max(Instance.received_at)))
        if newest is None:
            return removed
        rows = s.execute(
            select(Instance.id, Instance.series_id, Instance.size_bytes, Instance.path,
                   Instance.sha256, Instance.sop_instance_uid)
            .where(Instance.received_at >= newest - timedelta(seconds=window_s))
        ).all()
        bad: list[tuple[int, int, int]] = []
        for iid, sid, size, relpath, sha, sop in rows:
            try:
                ok = hashlib.sha256(store.spool_path(relpath).read_bytes()).hexdigest() == sha
            except (OSError, StorageError):
                ok = False
            if not ok:
                bad.append((iid, sid, size))
                removed.append(sop)
                audit(s, "instance.unverified_removed", outcome="warning",
                      sop_instance_uid=sop, instance_id=iid,
                      reason="file missing or not what was recorded after an unclean stop")
                with contextlib.suppress(OSError, StorageError):
                    store.spool_path(relpath).unlink(missing_ok=True)
        remove_rows(s, bad)
    if removed:
        log.warning("removed rows of unacknowledged instances whose files were incomplete",
                    extra={"count": len(removed)})
    return removed


def sweep_unrecorded(db: Database, store: FileStore) -> list[str]:
    """At start-up, before the port opens: remove and audit spool files that no row records.

    Why: a store links its file into the spool before its row commits (the
    two waits overlap, see ``Ingestor._record``); a SIGKILL of the whole
    process group in between leaves a complete file whose instance was never
    acknowledged and is recorded nowhere. Left there, the spool holds more
    files than the database knows, and retention never removes them. The
    sender still owns such an instance and sends it again. Returns the spool
    paths removed (relative to the spool).
    """
    with db.session() as s:
        recorded = set(s.scalars(select(Instance.path)))
    removed: list[str] = []
    for path in store.spool.rglob("*.dcm"):
        rel = path.relative_to(store.spool).as_posix()
        if rel.startswith(".") or rel in recorded:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(rel)
    if removed:
        with db.session() as s:
            for rel in removed:
                sop = rel.rsplit("/", 1)[-1].removesuffix(".dcm")
                audit(s, "instance.unrecorded_removed", outcome="warning",
                      sop_instance_uid=sop if len(sop) <= 64 else None, path=rel,
                      reason="spool file without its row after an unclean stop "
                             "(never acknowledged)")
        log.warning("removed spool files that no row records (never acknowledged)",
                    extra={"count": len(removed)})
    return removed
