"""The job runner behind ``ainode worker``: claim a job, run it on a device slot, supervise it.

Why a separate entry point: inference is the heavy part, so it can run in its
own process (or on another machine with a GPU) against the same database,
while ``ainode serve`` keeps receiving. Jobs are claimed transactionally
(storage.jobs), so any number of workers can share one queue.

This module is the thread/lease runner; the job body is ``node.jobs.run_job``,
a plain function any other runner can call after its own claim. What makes a
job run exactly once, even after SIGKILL:

* the claim commits RUNNING with a lease; a heartbeat renews it while the job runs;
* the results commit in ONE transaction with the job's DONE state, and only if
  this worker still holds the job (run_job; JobNotHeldError otherwise);
* a worker that died leaves RUNNING with a lapsing lease (or a dead pid on this
  host): the next worker start or the scheduler requeues it, and the rerun
  writes its files afresh under the job's id.

Concurrency is bounded per device (``inference.max_jobs_per_device`` slots),
each job has a time limit (``inference.job_timeout_s``), and pipelines stay
loaded between jobs (pipelines.registry keeps the built instance).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from node.config import NodeConfig
from node.jobs.run import (
    JobDeps,
    Loader,
    Queuer,
    Writer,
    default_load,
    default_queue,
    default_write,
    record_failure,
    resolve_device,
    run_job,
)
from storage import jobs as job_store
from storage.db import Database
from storage.errors import NodeError
from storage.filestore import FileStore
from storage.workers import CurrentJobs

__all__ = ["Worker"]

log = logging.getLogger(__name__)


@dataclass
class _Run:
    stage: str = "claimed"
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Worker:
    """One device's job runner; ``max_jobs_per_device`` jobs at a time on it."""

    def __init__(
        self,
        db: Database,
        store: FileStore,
        config: NodeConfig,
        *,
        name: str | None = None,
        lease_s: float = 60.0,
        concurrency: int | None = None,
        job_timeout_s: float | None = None,
        load: Loader = default_load,
        write: Writer = default_write,
        queue: Queuer = default_queue,
        current: CurrentJobs | None = None,
    ) -> None:
        self.db = db
        self._current = current  # reports each job's start and end on the worker's row
        self.store = store
        self.config = config
        self.name = name or job_store.new_worker_id()
        self.lease_s = lease_s
        self._device: str | None = None
        self.concurrency = concurrency or config.inference.max_jobs_per_device
        self.job_timeout_s = job_timeout_s or config.inference.job_timeout_s
        self._load = load
        self._write = write
        self._queue = queue
        self._slots = threading.BoundedSemaphore(self.concurrency)

    @property
    def device(self) -> str:
        """Resolved on the job-running thread once it has claimed its first job, before
        the job's clock starts: ``auto`` imports torch (seconds of CPU, about 300 MB),
        which a node that only receives should not pay, and which must not hold up
        start-up nor count against a job's time limit."""
        if self._device is None:
            self._device = resolve_device(self.config.inference.device)
        return self._device

    # -- entry points -------------------------------------------------------------------
    def recover(self) -> list[int]:
        """Requeue jobs of dead local workers and expired leases (call at start-up)."""
        return job_store.recover_dead_local_workers(self.db) + job_store.requeue_expired(self.db)

    def run_once(self) -> int | None:
        """Claim and run one job in this thread (within a device slot); its id, or None."""
        if not self._slots.acquire(blocking=False):
            return None
        try:
            job_id = job_store.claim_next(self.db, self.name, lease_s=self.lease_s)
            if job_id is not None:
                _ = self.device  # before the job's clock starts
                self._supervise(job_id)
            return job_id
        finally:
            self._slots.release()

    def run_available(self, max_jobs: int | None = None) -> int:
        """Run queued jobs one after the other until none is left; returns how many ran."""
        ran = 0
        while max_jobs is None or ran < max_jobs:
            if self.run_once() is None:
                break
            ran += 1
        return ran

    def serve(self, stop: threading.Event, *, poll_s: float = 2.0) -> None:
        """Run jobs on ``concurrency`` slot threads until ``stop`` is set."""
        def slot() -> None:
            while not stop.is_set():
                try:
                    job_id = job_store.claim_next(self.db, self.name, lease_s=self.lease_s)
                except NodeError as exc:
                    log.error("claim failed", extra={"error": str(exc)})
                    job_id = None
                except Exception:
                    log.exception("claim crashed")
                    job_id = None
                if job_id is None:
                    stop.wait(poll_s)
                    continue
                _ = self.device  # before the job's clock starts
                self._supervise(job_id)

        threads = [threading.Thread(target=slot, name=f"ainode-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def run_claimed(self, job_id: int) -> None:
        """Run a job this worker's name has already claimed (another runner's claim: a
        Celery task's), within a device slot, with the same heartbeat and time limit."""
        with self._slots:
            _ = self.device  # before the job's clock starts
            self._supervise(job_id)

    # -- one job ------------------------------------------------------------------------
    def _supervise(self, job_id: int) -> None:
        """Run the job on its own thread; renew the lease, enforce the time limit."""
        if self._current is not None:
            self._current.started(job_id)
        try:
            self._supervised(job_id)
        finally:
            if self._current is not None:
                self._current.ended(job_id)

    def _supervised(self, job_id: int) -> None:
        run = _Run()
        thread = threading.Thread(target=self._execute, args=(job_id, run),
                                  name=f"ainode-job-{job_id}", daemon=True)
        started = time.monotonic()
        thread.start()
        heartbeat = max(0.05, self.lease_s / 3)
        lost = False
        while not run.done.wait(heartbeat):
            if time.monotonic() - started > self.job_timeout_s:
                job_store.fail_job(self.db, job_id, self.name, stage=run.stage,
                                   error=f"time limit of {self.job_timeout_s:g} s exceeded "
                                         f"in stage {run.stage}", retryable=False)
                log.error("job timed out", extra={"job_id": job_id, "stage": run.stage})
                # Python cannot kill a thread: the slot stays taken until it returns,
                # so the device never runs more jobs than its slots. Its result is refused.
                run.done.wait()
                return
            if not lost and not job_store.renew_lease(self.db, job_id, self.name,
                                                      lease_s=self.lease_s):
                lost = True  # cancelled or taken over: let it finish, its result is refused
                log.warning("job no longer held; its result will be discarded",
                            extra={"job_id": job_id})
        if run.error is not None:
            record_failure(self.db, job_id, self.name, run.error, run.stage)

    def deps(self) -> JobDeps:
        """What run_job needs from this worker (resolves the device on first use)."""
        return JobDeps(self.db, self.store, self.config, self.device,
                       load=self._load, write=self._write, queue=self._queue)

    def _execute(self, job_id: int, run: _Run) -> None:
        def on_stage(stage: str) -> None:
            run.stage = stage

        try:
            run_job(job_id, self.name, self.deps(), on_stage=on_stage)
        except BaseException as exc:  # recorded on the job by the supervising thread
            run.error = exc
        finally:
            run.done.set()
