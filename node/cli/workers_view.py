"""Worker state for ``ainode status`` and ``ainode jobs list``: who is there, what waits.

Why here and not in the commands: both show the same two facts, the worker
processes as they last reported themselves (storage.workers) and, for each
queued job, whether any live worker consumes the queue its message went to,
so that a GPU job with only CPU workers reads "waiting", not "stuck".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from storage import workers as worker_store
from storage.db import Database
from storage.models import Job, JobState, utcnow

__all__ = ["WORKER_COLUMNS", "queued_without_worker", "waiting_reason", "worker_rows"]

WORKER_COLUMNS = ("name", "kind", "host", "device", "queues", "state", "current_job",
                  "last_heartbeat_at", "live")


def worker_rows(db: Database) -> list[dict[str, Any]]:
    now = utcnow()
    return [{"name": w.name, "kind": w.kind, "host": w.host, "pid": w.pid, "device": w.device,
             "queues": ",".join(str(q) for q in w.queues) or "-", "state": w.state,
             "current_job": w.current_job_id, "started_at": w.started_at,
             "last_heartbeat_at": w.last_heartbeat_at,
             "live": worker_store.is_live(w, now=now)}
            for w in worker_store.workers(db)]


def waiting_reason(job: Job, live: Iterable[str]) -> str | None:
    """Why a queued job is not being taken: no live worker consumes its queue."""
    if job.state != JobState.QUEUED or job.queue is None or job.queue in set(live):
        return None
    return f"no live worker for queue {job.queue}"


def queued_without_worker(db: Database) -> dict[str, int]:
    """Queued jobs per queue that no live worker consumes."""
    live = worker_store.live_queues(db)
    with db.session() as session:
        queues = session.scalars(select(Job.queue).where(Job.state == JobState.QUEUED,
                                                         Job.queue.is_not(None)))
        return dict(Counter(str(q) for q in queues if q not in live))
