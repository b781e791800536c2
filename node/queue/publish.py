"""Publishing ready jobs as Celery tasks, and the sweep that makes a lost message harmless.

A job is published when it becomes ready: routed (node.orchestration), put
back after a lapsed lease or a retryable failure. The message carries only
the job id; its queue is the device class the pipeline's package declares
(``device_class``: ``cpu`` by default, ``gpu`` for a model that needs one) or
the queue ``queue.pipeline_queues`` names; its priority is the rule's
(node.queue.app.message_priority).

Why a sweep: the broker may lose a message (a purged queue, a broker restored
from an old disk, a publish that failed while it was down). The job row
still says QUEUED, so the sweep publishes any queued job that has no
message yet (``published_at`` unset: a publish the broker refused, a job
queued again by ``ainode jobs retry``), and again any whose last message is
older than ``queue.publish_grace_s`` when the broker's queue holds fewer
ready messages than there are queued jobs for it (so a backlog that is
merely long is not doubled every grace period). A duplicate costs a
worker one read of the row. Every publish and every sweep that published is
audited.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select, update

from node.config import NodeConfig
from node.queue.app import TASK_NAME, broker_kind, message_priority
from pipelines import registry
from storage.audit import audit
from storage.db import Database
from storage.errors import ModelError
from storage.models import Job, JobState, utcnow

__all__ = ["Publisher", "device_class"]

log = logging.getLogger(__name__)

# A publish that finds the broker down gives up after about a second: the job
# keeps published_at unset, and the sweep publishes it once the broker is back.
_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0}


def device_class(pipeline: object) -> str:
    """What a pipeline object says it needs: ``gpu`` or (the default) ``cpu``."""
    value = str(getattr(pipeline, "device_class", "cpu") or "cpu").lower()
    return value if value in ("cpu", "gpu") else "cpu"


class Publisher:
    """Publishes job ids to the node's Celery app; records queue and time on the row."""

    def __init__(self, app: Celery, db: Database, config: NodeConfig, *,
                 actor: str = "scheduler",
                 queue_of: Callable[[str], str] | None = None) -> None:
        self.app = app
        self.db = db
        self.config = config
        self.actor = actor
        self.kind = broker_kind(config.queue.broker_url or "")
        self._queue_of = queue_of
        self._queues: dict[str, str] = {}

    def queue_for(self, pipeline: str) -> str:
        """The queue a pipeline's jobs go to (cached: a package does not change its mind)."""
        if self._queue_of is not None:
            return self._queue_of(pipeline)
        if pipeline in self.config.queue.pipeline_queues:
            return self.config.queue.pipeline_queues[pipeline]
        if pipeline not in self._queues:
            inf = self.config.inference
            try:
                built = registry.get(pipeline, models_dir=inf.models_dir, device=inf.device)
                self._queues[pipeline] = device_class(built)
            except ModelError as exc:  # the worker records why it cannot run
                log.warning("pipeline unavailable; its jobs go to the cpu queue",
                            extra={"pipeline": pipeline, "error": str(exc)})
                return "cpu"
        return self._queues[pipeline]

    def publish(self, job_ids: Iterable[int], reason: str) -> list[int]:
        """Publish each still-queued job; returns those the broker accepted.

        The row is stamped (queue, published_at, the audit event) and committed
        before the message goes out: a worker that gets the message at once must
        not find the row locked by our own bookkeeping. A publish the broker
        refuses clears the stamp, so the next sweep takes the job without waiting
        out the grace period.
        """
        ids = sorted(set(job_ids))
        if not ids:
            return []
        planned: list[tuple[int, str, int]] = []
        now = utcnow()
        with self.db.session() as session:
            for job in session.scalars(select(Job).where(Job.id.in_(ids),
                                                         Job.state == JobState.QUEUED)):
                queue = self.queue_for(job.pipeline)
                prio = message_priority(job.priority, self.kind)
                job.queue = queue
                job.published_at = now
                audit(session, "job.published", actor=self.actor, job_id=job.id,
                      queue=queue, priority=prio, reason=reason)
                planned.append((job.id, queue, prio))
        sent: list[int] = []
        failed: list[int] = []
        for job_id, queue, prio in planned:
            if failed:  # the broker is down: do not wait on it once per job
                failed.append(job_id)
                continue
            try:
                self.app.send_task(TASK_NAME, args=[job_id], queue=queue, routing_key=queue,
                                   priority=prio, retry=True, retry_policy=_RETRY)
            except Exception as exc:  # kombu raises its own and socket errors alike
                log.warning("publish failed; the sweep will publish the job again",
                            extra={"job_id": job_id, "queue": queue, "error": str(exc)})
                failed.append(job_id)
                continue
            sent.append(job_id)
        if failed:
            with self.db.session() as session:
                session.execute(update(Job).where(Job.id.in_(failed), Job.published_at == now)
                                .values(published_at=None))
                audit(session, "job.publish_failed", outcome="failure", actor=self.actor,
                      jobs=failed, reason=reason)
        if sent:
            log.info("jobs published", extra={"jobs": sent, "reason": reason})
        return sent

    def ready_messages(self, queue: str) -> int | None:
        """Messages waiting in the broker's queue; None when the broker cannot say."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
                return int(count)
        except Exception as exc:
            log.info("queue depth unknown", extra={"queue": queue, "error": str(exc)})
            return None

    def sweep(self, *, now: datetime | None = None) -> list[int]:
        """Re-publish queued jobs whose message may be lost; returns their ids."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.config.queue.publish_grace_s)
        with self.db.session() as session:
            queued = [(j.id, j.pipeline, j.published_at) for j in session.scalars(
                select(Job).where(Job.state == JobState.QUEUED))]
        if not queued:
            return []
        per_queue = Counter(self.queue_for(p) for _, p, _ in queued)
        due = [(i, self.queue_for(p), at) for i, p, at in queued if at is None or at < cutoff]
        chosen: list[int] = []
        ready: dict[str, int | None] = {}
        for job_id, queue, at in due:
            if at is None:
                chosen.append(job_id)  # never published (or refused, or retried by hand)
                continue
            if queue not in ready:
                ready[queue] = self.ready_messages(queue)
            depth = ready[queue]
            if depth is not None and depth >= per_queue[queue]:
                continue  # every queued job can still have its message there
            chosen.append(job_id)
        published = self.publish(chosen, "sweep")
        if published:
            with self.db.session() as session:
                audit(session, "queue.sweep", outcome="warning", actor=self.actor,
                      jobs=published, broker_ready={q: d for q, d in ready.items()},
                      grace_s=self.config.queue.publish_grace_s)
            log.warning("sweep re-published jobs", extra={"jobs": published})
        return published
