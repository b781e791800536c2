"""The running node: receiver process(es) plus the scheduler of periodic work.

Start-up order is chosen for crash recovery: staging files left by a killed
node are removed first (they were never acknowledged), the schema is brought
to head, the files of the last instances received are checked against their
rows (``storage.ingest.verify_recent``), and only then does the port open. The scheduler runs series
completion every second and the orchestration tasks (routing, requeueing
orphaned jobs, sending results, spool retention) on their own intervals.

Jobs run in a separate worker (node.worker) that claims them from the
database. By default the node runs one in-process, on a thread, so a single
machine needs nothing else; with ``run_jobs=False`` (``ainode serve
--no-jobs``) the node only receives, routes and sends, and ``ainode worker``
processes on GPU machines sharing the database run the jobs.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.network.dispatch import Dispatcher, channel_pair
from node.network.scp import Receiver, ReceiverSettings
from storage import migrate
from storage.audit import audit
from storage.db import Database
from storage.errors import ConfigError, NodeError, StorageError
from storage.filestore import FileStore
from storage.ingest import Ingestor, verify_recent
from storage.models import utcnow
from storage.series import CompletedSeries, close_stable_series

__all__ = ["NodeService", "default_workers"]

log = logging.getLogger(__name__)

_WORKER_START_TIMEOUT_S = 60.0


def default_workers() -> int:
    """Four receiver processes, more on machines with more than four cores (at most 8).

    Why not one per core: a receiver spends much of each store waiting on the
    disk (the file's fsync, the commit), and associations that share a process
    share its GIL; the kernel, not the core count, does the waiting. With four
    storescu senders on 2 cores (bench_ingest, one alternating run each): 2
    processes 0.73 of Orthanc's rate, 4 processes 1.07 (single runs on that
    machine vary widely; bench/RESULTS.md has the medians). Each process costs
    about 50-100 MB.
    """
    return max(4, min(8, os.cpu_count() or 1))


class NodeService:
    """Owns the database, the file store, the receivers and the scheduler of one node."""

    def __init__(self, config: NodeConfig, *, workers: int = 1,
                 completion_interval_s: float = 1.0, run_jobs: bool = True) -> None:
        if workers < 1:
            raise ConfigError("workers must be at least 1")
        self.config = config
        self.workers = workers
        self.completion_interval_s = completion_interval_s
        s = config.storage
        self.db = Database(s.effective_database_url)
        self.store = FileStore(s.data_dir, spool_dir=s.spool_dir, results_dir=s.results_dir,
                               min_free_mb=s.min_free_mb)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self._receiver: Receiver | None = None
        self._dispatcher: Dispatcher | None = None
        self._children: list[subprocess.Popen[bytes]] = []
        self.run_jobs = run_jobs
        self._jobs_stop = threading.Event()
        self._jobs_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._receiver is None:
            raise RuntimeError("node not started")
        return self._receiver.port

    def start(self) -> None:
        removed = self.store.remove_partials()
        if removed:
            log.warning("removed partial files left by an earlier crash",
                        extra={"count": len(removed)})
        migrate.upgrade(self.db)
        verify_recent(self.db, self.store)
        settings = ReceiverSettings.from_config(self.config.dicom)
        # dicom.max_associations is the node's limit: each process takes its share
        # (the dispatcher keeps them evenly loaded), and a process at its share
        # refuses the association as pynetdicom does (A-ASSOCIATE-RJ, transient).
        settings = replace(settings, max_associations=self._share())
        self._dispatcher = Dispatcher() if self.workers > 1 else None
        # The other receiver processes first: the port opens only when all can serve.
        try:
            for _ in range(self.workers - 1):
                self._children.append(self._spawn_worker())
            self._receiver = Receiver(settings, Ingestor(self.db, self.store),
                                      dispatcher=self._dispatcher)
            self._receiver.start()
        except BaseException:
            self.stop()
            raise
        self.scheduler.add_job(
            self.complete_series, "interval", seconds=self.completion_interval_s,
            id="series-completion", max_instances=1, coalesce=True, replace_existing=True,
        )
        if self.workers > 1:
            self.scheduler.add_job(
                self.replace_dead_receivers, "interval", seconds=2.0, id="receiver-supervision",
                max_instances=1, coalesce=True, replace_existing=True,
            )
        self._start_orchestration()
        self.scheduler.start()
        log.info("node started", extra={"port": self.port, "workers": self.workers,
                                        "run_jobs": self.run_jobs})

    def _start_orchestration(self) -> None:
        """Destinations from the config, the periodic tasks, and the local job worker."""
        from node.orchestration import Services, register_tasks
        from node.send import send_due
        from node.worker import Worker
        from storage import destinations

        with self.db.session() as s:
            destinations.sync_from_config(s, self.config.destinations, actor="config")
        services = Services(self.config, self.db, self.store, send_due=send_due)
        # close_series: this service completes series itself, every second.
        # dispatch_jobs without services.worker only requeues orphaned jobs; the
        # worker thread below claims jobs as soon as they are queued.
        register_tasks(self.scheduler, services, {"close_series": 0})
        if self.run_jobs:
            worker = Worker(self.db, self.store, self.config)
            requeued = worker.recover()
            if requeued:
                log.warning("requeued jobs left running by an earlier crash",
                            extra={"jobs": requeued})
            self._jobs_stop.clear()
            self._jobs_thread = threading.Thread(
                target=worker.serve, args=(self._jobs_stop,), kwargs={"poll_s": 1.0},
                name="ainode-jobs", daemon=True,
            )
            self._jobs_thread.start()

    def _share(self) -> int:
        return max(1, -(-self.config.dicom.max_associations // self.workers))

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        assert self._dispatcher is not None
        ours, theirs = channel_pair()
        config = self.config.model_dump(mode="json")
        config["dicom"]["max_associations"] = self._share()
        request = {
            "config": config,
            "channel_fd": theirs.fileno(),
            "parent_pid": os.getpid(),
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.network.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.close()
        ready, _, _ = select.select([proc.stdout], [], [], _WORKER_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            proc.kill()
            proc.wait(timeout=10)
            ours.close()
            raise StorageError(f"receiver worker did not start (exit code {proc.returncode})")
        self._dispatcher.add(ours, proc.pid)
        return proc

    def complete_series(self) -> list[CompletedSeries]:
        """The scheduled step; a failure is logged and retried on the next tick."""
        try:
            return close_stable_series(self.db, self.config.series.stable_age_s, utcnow())
        except NodeError:
            log.exception("series completion failed; retrying next tick")
            return []

    def replace_dead_receivers(self) -> list[int]:
        """Start a new receiver process for each one that died (a crash, the OOM killer).

        The dispatcher stopped handing the dead one connections when its channel
        closed; its associations in flight were never acknowledged past what had
        been committed, so their senders retry. Returns the new processes' pids.
        """
        started: list[int] = []
        for i, proc in enumerate(self._children):
            code = proc.poll()
            if code is None:
                continue
            log.error("receiver process exited; starting another",
                      extra={"pid": proc.pid, "exit_code": code})
            if proc.stdout is not None:
                proc.stdout.close()
            try:
                self._children[i] = self._spawn_worker()
            except (StorageError, OSError):
                log.exception("could not start a replacement receiver process")
                continue
            started.append(self._children[i].pid)
            log.warning("replacement receiver process started",
                        extra={"pid": self._children[i].pid})
            try:
                with self.db.session() as s:
                    audit(s, "receiver.replaced", outcome="warning", pid=proc.pid,
                          exit_code=code, new_pid=self._children[i].pid)
            except SQLAlchemyError:
                log.exception("could not audit a replaced receiver process")
        return started

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let stores in flight finish, stop workers, then the scheduler.

        A job still running on the local worker after ``grace_s`` is abandoned
        with the process; its lease makes the next start requeue it.
        """
        self._jobs_stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        for proc in self._children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if self._receiver is not None:
            self._receiver.stop(grace_s)
            self._receiver = None
        deadline = time.monotonic() + grace_s + 5
        for proc in self._children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        self._children = []
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self._jobs_thread is not None:
            self._jobs_thread.join(timeout=grace_s)
            self._jobs_thread = None
        self.db.dispose()
        log.info("node stopped")

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._children if p.poll() is None]
