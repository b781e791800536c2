"""Jobs: created once per series + rule version + model version, claimed in a transaction.

Why claiming is a transaction on the row, not a lock file or a queue process:
several workers, possibly on other machines, share one database. On
PostgreSQL a worker takes the most urgent queued job with
``SELECT ... FOR UPDATE SKIP LOCKED`` (others skip the locked row instead of
waiting for it); on SQLite, which has no row locks, ``BEGIN IMMEDIATE`` takes
the write lock before the read, so two claimers are serialised. Either way the
state change to RUNNING commits with the claim, so each job is claimed once.

A claim carries a lease. A worker renews it while it runs; a job whose lease
expired (its worker died: SIGKILL, power loss, a lost machine) goes back to the
queue, up to ``max_attempts``. Results are only accepted from the worker that
still holds the job, so a job requeued behind a slow worker finishes once.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.audit import audit
from storage.db import Database
from storage.errors import InputError, JobNotHeldError
from storage.models import Job, JobOutcome, JobState, RoutingRule, Series, utcnow

__all__ = [
    "ACTIVE_STATES",
    "JobRequest",
    "cancel_job",
    "claim_job",
    "claim_next",
    "ensure_job",
    "fail_job",
    "finish_job",
    "get_job",
    "new_worker_id",
    "queue_depth",
    "recover_dead_local_workers",
    "renew_lease",
    "reprocess_job",
    "requeue_expired",
    "retry_job",
    "set_stage",
    "write_session",
]

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


@contextmanager
def write_session(db: Database) -> Iterator[Session]:
    """A transaction that will write after reading.

    On SQLite a deferred transaction that reads and then writes fails at once
    with SQLITE_BUSY when another connection committed in between (WAL
    snapshots cannot be upgraded); ``BEGIN IMMEDIATE`` takes the write lock
    first and waits its turn (busy_timeout) instead. PostgreSQL needs nothing.
    """
    with db.session() as session:
        if db.is_sqlite:
            session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        yield session


def new_worker_id() -> str:
    """``host:pid:nonce``; host and pid let a restarted node recover its own dead claims."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What routing (or an admin) asks for; storage decides whether it is new."""

    pipeline: str
    model_version: str
    rule: RoutingRule | None = None
    priority: int = 0
    shadow: bool = False
    max_attempts: int = 3

    @property
    def rule_key(self) -> str:
        return f"{self.rule.name}@v{self.rule.version}" if self.rule is not None else "manual"


def _series_uids(job: Job) -> dict[str, Any]:
    s = job.series
    return {"series_uid": s.series_instance_uid, "study_uid": s.study.study_instance_uid}


def ensure_job(session: Session, series: Series, req: JobRequest, *, actor: str = "scheduler",
               new_generation: bool = False) -> tuple[Job, bool]:
    """The job for (series, rule version, pipeline, model version); created when missing.

    Returns (job, created). Sending the same study again therefore never makes a
    second job; ``new_generation`` (reprocess) is the explicit way to ask for one.
    The unique constraint decides between two schedulers racing on one series.
    """
    key = (Job.series_id == series.id, Job.rule_key == req.rule_key,
           Job.pipeline == req.pipeline, Job.model_version == req.model_version)
    generation = 0
    if new_generation:
        last = session.scalar(select(func.max(Job.generation)).where(*key))
        generation = 0 if last is None else last + 1
    else:
        existing = session.scalars(select(Job).where(*key).order_by(Job.generation)).first()
        if existing is not None:
            return existing, False
    job = Job(
        series_id=series.id,
        rule_id=req.rule.id if req.rule is not None else None,
        rule_key=req.rule_key,
        pipeline=req.pipeline,
        model_version=req.model_version,
        generation=generation,
        priority=req.priority,
        shadow=req.shadow,
        max_attempts=req.max_attempts,
        state=JobState.QUEUED,
        created_at=utcnow(),
        series_instance_count=series.instance_count,  # the series version it is for
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        other = session.scalars(
            select(Job).where(*key, Job.generation == generation)).first()
        if other is None:
            raise
        return other, False
    audit(session, "job.created", actor=actor, study_uid=series.study.study_instance_uid,
          series_uid=series.series_instance_uid, job_id=job.id, rule=req.rule_key,
          pipeline=req.pipeline, model_version=req.model_version, generation=generation,
          shadow=req.shadow)
    log.info("job created", extra={"job_id": job.id, "series_uid": series.series_instance_uid,
                                   "rule": req.rule_key})
    return job, True


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise InputError(f"no job {job_id}")
    return job


def queue_depth(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.state == JobState.QUEUED)) or 0


# -- claiming -------------------------------------------------------------------------


def claim_next(db: Database, worker: str, *, lease_s: float,
               pipelines: Sequence[str] | None = None) -> int | None:
    """Claim the most urgent queued job for ``worker``; returns its id, or None.

    Order: higher priority first, then oldest. ``pipelines`` limits the claim to
    the pipelines this worker can run.
    """
    # On SQLite, write_session takes the write lock before reading, so no other
    # claimer can read the same queued row between our SELECT and UPDATE.
    with write_session(db) as session:
        q = (select(Job).where(Job.state == JobState.QUEUED)
             .order_by(Job.priority.desc(), Job.created_at, Job.id).limit(1))
        if pipelines is not None:
            q = q.where(Job.pipeline.in_(list(pipelines)))
        if not db.is_sqlite:
            q = q.with_for_update(skip_locked=True)
        job = session.scalars(q).first()
        if job is None:
            return None
        _start(session, job, worker, lease_s)
        return job.id


def claim_job(db: Database, job_id: int, worker: str, *, lease_s: float,
              pipelines: Sequence[str] | None = None) -> bool:
    """Claim this one job for ``worker`` if it is queued; False when it is not claimable.

    What a task-queue worker does with a message naming the job: the message
    is only a hint, the row decides. A duplicate message, a stale one (the
    job ran, was cancelled, or is held under a live lease by another worker)
    or one for a pipeline this worker cannot run finds nothing to claim.
    """
    with write_session(db) as session:
        q = select(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
        if pipelines is not None:
            q = q.where(Job.pipeline.in_(list(pipelines)))
        if not db.is_sqlite:
            # Wait for the row, not skip it: whoever holds its lock (another claimer of a
            # duplicate message, the publisher stamping it) is done in milliseconds, and
            # the state we then read is the answer. Skipping would drop a good message.
            q = q.with_for_update()
        job = session.scalars(q).first()
        if job is None:
            return False
        _start(session, job, worker, lease_s)
        return True


def _start(session: Session, job: Job, worker: str, lease_s: float) -> None:
    now = utcnow()
    job.state = JobState.RUNNING
    job.worker = worker[:128]
    job.attempts += 1
    job.started_at = now
    job.finished_at = None
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.stage = "claimed"
    audit(session, "job.started", actor=worker[:128], job_id=job.id,
          attempt=job.attempts, **_series_uids(job))
    log.info("job claimed", extra={"job_id": job.id, "worker": worker,
                                   "attempt": job.attempts})


def _owned(session: Session, job_id: int, worker: str) -> Job:
    """The job, locked for update, if ``worker`` still holds it; JobNotHeldError otherwise."""
    q = select(Job).where(Job.id == job_id)
    if session.get_bind().dialect.name != "sqlite":
        q = q.with_for_update()
    job = session.scalars(q).first()
    if job is None or job.state != JobState.RUNNING or job.worker != worker[:128]:
        state = "gone" if job is None else f"{job.state.value}, held by {job.worker}"
        raise JobNotHeldError(f"job {job_id} is no longer held by this worker ({state})")
    return job


def renew_lease(db: Database, job_id: int, worker: str, *, lease_s: float) -> bool:
    """Extend the lease; False when the job was taken away (cancelled, requeued)."""
    with db.session() as session:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker[:128])
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def set_stage(db: Database, job_id: int, worker: str, stage: str) -> None:
    with db.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker[:128])
            .values(stage=stage[:32])
        )


def finish_job(session: Session, job_id: int, worker: str, *,
               outcome: JobOutcome = JobOutcome.ASSESSED, outcome_reason: str | None = None,
               **provenance: Any) -> Job:
    """Mark DONE in the caller's transaction (with its outputs and findings, or none of them).

    ``outcome`` is the pipeline's verdict. A not-assessable job is DONE, not
    FAILED: the pipeline ran and reported, in its SR, why it could not judge
    the series, and retrying would give the same answer. It gets its own
    audit event, ``job.not_assessable`` with the reason, so an admin finds
    those series without reading every report.
    """
    if outcome == JobOutcome.NOT_ASSESSABLE and not outcome_reason:
        raise ValueError("a not-assessable job needs the reason")
    job = _owned(session, job_id, worker)
    job.state = JobState.DONE
    job.stage = "done"
    job.error = None
    job.finished_at = utcnow()
    job.lease_expires_at = None
    job.outcome = outcome
    job.outcome_reason = outcome_reason
    job.provenance = {**job.provenance, **provenance}
    audit(session, "job.done", actor=worker[:128], job_id=job.id, attempt=job.attempts,
          job_outcome=outcome.value, **_series_uids(job))
    if outcome == JobOutcome.NOT_ASSESSABLE:
        audit(session, "job.not_assessable", outcome="warning", actor=worker[:128],
              job_id=job.id, reason=(outcome_reason or "")[:2000], pipeline=job.pipeline,
              **_series_uids(job))
    log.info("job done", extra={"job_id": job.id, "outcome": outcome.value})
    return job


def fail_job(db: Database, job_id: int, worker: str, *, stage: str, error: str,
             retryable: bool) -> JobState | None:
    """Record a failure; requeue while attempts remain and the error may pass.

    Returns the new state, or None when the worker no longer held the job (its
    failure is then not recorded over whatever happened to the job meanwhile).
    """
    with write_session(db) as session:
        try:
            job = _owned(session, job_id, worker)
        except JobNotHeldError:
            return None
        again = retryable and job.attempts < job.max_attempts
        job.state = JobState.QUEUED if again else JobState.FAILED
        job.stage = stage[:32]
        job.error = error
        job.lease_expires_at = None
        job.finished_at = None if again else utcnow()
        audit(session, "job.retry" if again else "job.failed", outcome="failure",
              actor=worker[:128], job_id=job.id, stage=stage, error=error[:2000],
              attempt=job.attempts, **_series_uids(job))
        log.warning("job failed", extra={"job_id": job.id, "stage": stage,
                                         "requeued": again})
        return job.state


def _release(session: Session, jobs: Sequence[Job], why: str, now: datetime) -> list[int]:
    ids = []
    for job in jobs:
        again = job.attempts < job.max_attempts
        previous = job.worker
        job.state = JobState.QUEUED if again else JobState.FAILED
        job.error = f"{why} (worker {previous}, attempt {job.attempts})"
        job.lease_expires_at = None
        job.worker = None
        if not again:
            job.finished_at = now
        audit(session, "job.requeued" if again else "job.failed", outcome="warning",
              actor="scheduler", job_id=job.id, reason=why, worker=previous,
              attempt=job.attempts, **_series_uids(job))
        log.warning("job released", extra={"job_id": job.id, "reason": why, "requeued": again})
        ids.append(job.id)
    return ids


def requeue_expired(db: Database, *, now: datetime | None = None) -> list[int]:
    """Put running jobs whose lease ran out back in the queue (their worker is gone)."""
    now = now or utcnow()
    with write_session(db) as session:
        q = select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        if not db.is_sqlite:
            q = q.with_for_update(skip_locked=True)
        return _release(session, list(session.scalars(q)), "lease expired", now)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_local_workers(db: Database) -> list[int]:
    """At start-up: requeue jobs held by a dead process on this host, without waiting
    for their lease (a node restarted after SIGKILL resumes at once)."""
    host = socket.gethostname()
    with write_session(db) as session:
        q = select(Job).where(Job.state == JobState.RUNNING, Job.worker.like(f"{host}:%"))
        dead = []
        for job in session.scalars(q):
            parts = (job.worker or "").split(":")
            if len(parts) >= 2 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                dead.append(job)
        return _release(session, dead, "worker process died", utcnow())


# -- admin actions ----------------------------------------------------------------------


def cancel_job(session: Session, job_id: int, *, actor: str) -> Job:
    """Cancel a queued or running job; a running worker's result is then refused."""
    job = get_job(session, job_id)
    if job.state not in ACTIVE_STATES:
        raise InputError(f"job {job_id} is {job.state.value}; only queued or running jobs "
                         "can be cancelled")
    job.state = JobState.CANCELLED
    job.finished_at = utcnow()
    job.lease_expires_at = None
    audit(session, "job.cancelled", actor=actor, job_id=job.id, **_series_uids(job))
    return job


def retry_job(session: Session, job_id: int, *, actor: str) -> Job:
    """Queue a failed or cancelled job again with a fresh attempt budget."""
    job = get_job(session, job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise InputError(f"job {job_id} is {job.state.value}; only failed or cancelled jobs "
                         "can be retried")
    job.state = JobState.QUEUED
    job.attempts = 0
    job.error = None
    job.stage = None
    job.worker = None
    job.finished_at = None
    job.published_at = None  # no message for this attempt yet: the next sweep sends one
    audit(session, "job.retried", actor=actor, job_id=job.id, **_series_uids(job))
    return job


def reprocess_job(session: Session, series: Series, req: JobRequest, *, actor: str) -> Job:
    """An explicitly requested new run (a new generation) of a series, even if one exists."""
    job, _ = ensure_job(session, series, req, actor=actor, new_generation=True)
    audit(session, "series.reprocess", actor=actor, study_uid=series.study.study_instance_uid,
          series_uid=series.series_instance_uid, job_id=job.id, rule=req.rule_key)
    return job
