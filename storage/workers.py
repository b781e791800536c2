"""Worker processes as they report themselves: who is there, on what device, doing what.

Why a table rather than asking the broker: operators look at ``ainode
status`` on the node, which sees the database, not necessarily the broker's
management interface; and the database is where the job rows live, so one
query shows a queued GPU job beside the fact that no GPU worker is alive.
A row is only a report. Holding a job is decided by the job row's lease
(storage.jobs), never by this table.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update

from storage.db import Database
from storage.models import WorkerState, utcnow

__all__ = [
    "HEARTBEAT_S",
    "STALE_S",
    "CurrentJobs",
    "heartbeat_forever",
    "is_live",
    "live_queues",
    "record_heartbeat",
    "register",
    "set_current",
    "set_stopped",
    "workers",
]

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often a worker renews its row
STALE_S = 3.5 * HEARTBEAT_S  # a row not renewed for this long is no live worker


def register(db: Database, name: str, *, kind: str, device: str,
             queues: Sequence[str]) -> None:
    """Insert or refresh this process' row at start-up."""
    now = utcnow()
    with db.session() as session:
        row = session.get(WorkerState, name[:128])
        if row is None:
            row = WorkerState(name=name[:128])
            session.add(row)
        row.kind = kind
        row.host = socket.gethostname()[:255]
        row.pid = os.getpid()
        row.device = device[:32]
        row.queues = list(queues)
        row.state = "idle"
        row.current_job_id = None
        row.started_at = now
        row.last_heartbeat_at = now


def record_heartbeat(db: Database, name: str) -> None:
    with db.session() as session:
        session.execute(update(WorkerState).where(WorkerState.name == name[:128])
                        .values(last_heartbeat_at=utcnow()))


def set_current(db: Database, name: str, job_id: int | None) -> None:
    """The job this worker runs now (None: idle); also a heartbeat."""
    with db.session() as session:
        session.execute(update(WorkerState).where(WorkerState.name == name[:128]).values(
            current_job_id=job_id, state="running" if job_id is not None else "idle",
            last_heartbeat_at=utcnow()))


def set_stopped(db: Database, name: str) -> None:
    with db.session() as session:
        session.execute(update(WorkerState).where(WorkerState.name == name[:128]).values(
            current_job_id=None, state="stopped", last_heartbeat_at=utcnow()))


def is_live(row: WorkerState, *, stale_s: float = STALE_S, now: datetime | None = None) -> bool:
    """Alive as far as the table can tell: not stopped, heartbeat within ``stale_s``."""
    now = now or utcnow()
    return row.state != "stopped" and row.last_heartbeat_at >= now - timedelta(seconds=stale_s)


def workers(db: Database) -> list[WorkerState]:
    with db.session() as session:
        rows = list(session.scalars(select(WorkerState).order_by(WorkerState.host,
                                                                 WorkerState.name)))
        session.expunge_all()
        return rows


def live_queues(db: Database, *, stale_s: float = STALE_S) -> set[str]:
    """The queues at least one live worker consumes."""
    now = utcnow()
    return {str(q) for row in workers(db) if is_live(row, stale_s=stale_s, now=now)
            for q in row.queues}


class CurrentJobs:
    """The jobs one worker process runs now, reported on its row as they start and end.

    A report, never a reason to fail a job: a database hiccup here is logged and
    the next start, end or heartbeat writes the row again.
    """

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name
        self._running: set[int] = set()
        self._lock = threading.Lock()

    def started(self, job_id: int) -> None:
        self._update(job_id, add=True)

    def ended(self, job_id: int) -> None:
        self._update(job_id, add=False)

    def _update(self, job_id: int, *, add: bool) -> None:
        with self._lock:
            (self._running.add if add else self._running.discard)(job_id)
            current = min(self._running) if self._running else None
        try:
            set_current(self.db, self.name, current)
        except Exception as exc:
            log.warning("worker state not recorded", extra={"error": str(exc)})


def heartbeat_forever(db: Database, name: str, stop: threading.Event) -> threading.Thread:
    """Renew ``name``'s row every HEARTBEAT_S on a daemon thread until ``stop`` is set."""
    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                record_heartbeat(db, name)
            except Exception as exc:
                log.warning("worker heartbeat not recorded", extra={"error": str(exc)})

    thread = threading.Thread(target=beat, name="ainode-worker-heartbeat", daemon=True)
    thread.start()
    return thread
