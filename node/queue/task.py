"""The Celery task: claim the job the message names, run it under a lease, commit.

Idempotent by construction: the task body is "if the row says this job is
queued, claim it in a transaction and run it". A second delivery of the same
message (a duplicate publish, a redelivery after a broker restart, the
sweep's re-publish) finds it running or done and returns without running
anything, and the message is acknowledged. The job's results commit with
its DONE state only while this worker still holds the lease (node.jobs).
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import select

from node.config import NodeConfig
from node.queue.app import TASK_NAME
from node.queue.publish import Publisher, device_class
from node.worker import Worker
from pipelines import registry
from storage import jobs as job_store
from storage import workers as worker_rows
from storage.db import Database
from storage.errors import ModelError
from storage.filestore import FileStore
from storage.models import Job, JobState

__all__ = ["CeleryRunner", "register_task"]

log = logging.getLogger(__name__)


class CeleryRunner:
    """What one ``ainode worker --celery`` process runs its tasks with."""

    def __init__(self, db: Database, store: FileStore, config: NodeConfig,
                 publisher: Publisher, *, concurrency: int, lease_s: float) -> None:
        self.db = db
        self.config = config
        self.publisher = publisher
        name = job_store.new_worker_id()
        self.worker = Worker(db, store, config, name=name, lease_s=lease_s,
                             concurrency=concurrency, current=worker_rows.CurrentJobs(db, name))
        self.name = name
        self.lease_s = lease_s

    def _fits(self, job_id: int) -> tuple[bool, str]:
        """Whether this worker's device can run the job (a GPU model never runs on a CPU)."""
        with self.db.session() as session:
            row = session.execute(select(Job.pipeline, Job.queue).where(Job.id == job_id)).first()
        if row is None:
            return False, "no such job"
        pipeline, queue = row
        if self.worker.device != "cpu":
            return True, ""
        if queue == "gpu":
            return False, f"job {job_id} was published for a GPU and this worker runs on the CPU"
        inf = self.config.inference
        try:
            built = registry.get(pipeline, models_dir=inf.models_dir, device="cpu")
        except ModelError:
            return True, ""  # the run records why it cannot build
        if device_class(built) == "gpu":
            return False, f"pipeline {pipeline} needs a GPU and this worker runs on the CPU"
        return True, ""

    def handle(self, job_id: int) -> str:
        """The task body; returns what happened, for Celery's log and task events."""
        fits, why = self._fits(job_id)
        if not fits:
            log.warning("message refused, job left queued", extra={"job_id": job_id,
                                                                   "reason": why})
            return f"refused: {why}"
        if not job_store.claim_job(self.db, job_id, self.name, lease_s=self.lease_s):
            log.info("stale or duplicate message: job not claimable", extra={"job_id": job_id})
            return "skipped: not claimable"
        self.worker.run_claimed(job_id)
        with self.db.session() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        if state == JobState.QUEUED:  # a retryable failure: publish the next attempt now
            self.publisher.publish([job_id], "retry")
        return f"ran: {state}"


def register_task(app: Celery, runner: CeleryRunner) -> None:
    """Bind the task name to this process' runner."""

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: int) -> str:
        return runner.handle(int(job_id))
