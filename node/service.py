"""The running node: its receivers (node.network.pool) plus the scheduler of periodic work.

Start-up order is chosen for crash recovery: staging files left by a killed
node are removed first (they were never acknowledged), the schema is brought
to head, the files of the last instances received are checked against their
rows (``storage.ingest.verify_recent``), spool files without a row are removed
(``sweep_unrecorded``), and only then does the port open. The scheduler runs series
completion every second and the orchestration tasks (routing, requeueing
orphaned jobs, sending results, spool retention) on their own intervals; every
task is node.orchestration's, so there is one ``close_series``.

Jobs run in a separate worker (node.worker) that claims them from the
database. By default the node runs one in-process, on a thread, so a single
machine needs nothing else; with ``run_jobs=False`` (``ainode serve
--no-jobs``) the node only receives, routes and sends, and ``ainode worker``
processes on GPU machines sharing the database run the jobs. With
``queue.broker_url`` set, the node runs no jobs itself either: it publishes
each ready job to the broker (node.queue) for ``ainode worker --celery``
processes, and sweeps for jobs whose message was lost. Without it, nothing
here changes and no broker is needed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError

from node import heartbeat
from node.audit_trail import AuditTrail
from node.config import NodeConfig
from node.network.pool import ReceiverPool, default_workers
from storage import migrate
from storage.db import Database
from storage.errors import ConfigError, NodeError
from storage.filestore import FileStore
from storage.ingest import sweep_unrecorded, verify_recent
from storage.migrate import db_reason

if TYPE_CHECKING:
    from node.orchestration import Services

__all__ = ["NodeService", "default_workers"]


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

log = logging.getLogger(__name__)


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
        self.receivers = ReceiverPool(config, self.db, self.store, workers=workers)
        self.run_jobs = run_jobs
        self._jobs_stop = threading.Event()
        self._jobs_thread: threading.Thread | None = None
        self.web: Any = None  # node.web.WebServer when config.web.enabled
        self._audit_trail: AuditTrail | None = None
        self._node_name: str | None = None  # its workers-table row, with Celery dispatch

    @property
    def port(self) -> int:
        try:
            return self.receivers.port
        except RuntimeError:
            raise RuntimeError("node not started") from None

    def start(self) -> None:
        removed = self.store.remove_partials()
        if removed:
            log.warning("removed partial files left by an earlier crash",
                        extra={"count": len(removed)})
        migrate.wait_until_reachable(self.db, self.config.storage.database_wait_s)
        migrate.upgrade(self.db)
        verify_recent(self.db, self.store)
        sweep_unrecorded(self.db, self.store)
        try:
            self.receivers.start()
        except BaseException:
            self.stop()
            raise
        if self.workers > 1:
            self.scheduler.add_job(
                self.receivers.replace_dead, "interval", seconds=2.0,
                id="receiver-supervision", max_instances=1, coalesce=True,
                replace_existing=True,
            )
        self._start_orchestration()
        self._beat()
        self.scheduler.add_job(self._beat, "interval", seconds=heartbeat.INTERVAL_S,
                               id="ainode.heartbeat", max_instances=1, coalesce=True,
                               replace_existing=True)
        self.scheduler.start()
        if self.config.web.enabled:
            self._start_web()
        log.info("node started", extra={"port": self.port, "workers": self.workers,
                                        "run_jobs": self.run_jobs})

    def _beat(self) -> None:
        try:
            heartbeat.beat(self.db, port=self.port, receivers=self.workers,
                           ae_title=self.config.dicom.ae_title, run_jobs=self.run_jobs)
        except NodeError as exc:  # the database away for a moment: the next beat says so
            log.warning("heartbeat not recorded", extra={"error": str(exc)})
        except SQLAlchemyError as exc:
            log.warning("heartbeat not recorded", extra={"error": db_reason(exc)})

    def _start_orchestration(self) -> None:
        """Destinations from the config, the periodic tasks, and the local job worker."""
        from node.orchestration import Services, register_tasks
        from node.send import send_due
        from node.worker import Worker
        from storage import destinations

        with self.db.session() as s:
            destinations.sync_from_config(s, self.config.destinations, actor="config")
        services = Services(self.config, self.db, self.store, send_due=send_due)
        intervals = {"close_series": self.completion_interval_s}
        if self.config.queue.broker_url:
            intervals["sweep_queue"] = self._start_dispatch(services)
        if self.config.qa.enabled:  # drift monitoring: the window against the references
            intervals["check_quality"] = self.config.qa.interval_s
        # close_series on the service's own tick (every second by default): a quiet
        # series should not wait a whole routing interval to complete.
        # dispatch_jobs without services.worker only requeues orphaned jobs; the
        # worker thread below claims jobs as soon as they are queued.
        register_tasks(self.scheduler, services, intervals)
        self._start_audit_trail()
        if self.run_jobs and services.publisher is None:
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

    def _start_web(self) -> None:
        """The console and APIs on a thread, told what only the service knows: liveness."""
        from node.web import WebContext, WebServer
        from node.web.context import port_listening

        host = self.config.dicom.host
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        ctx = WebContext(self.config, self.db, self.store,
                         receivers_alive=lambda: port_listening(probe_host, self.port),
                         workers_alive=self._workers_alive)
        self.web = WebServer(ctx)
        try:
            self.web.start()
        except BaseException:
            self.stop()
            raise

    def _workers_alive(self) -> dict[str, bool]:
        alive = {f"receiver {pid}": _pid_alive(pid) for pid in self.receivers.pids()}
        if self.run_jobs:
            alive["local job worker"] = (self._jobs_thread is not None
                                         and self._jobs_thread.is_alive())
        return alive

    def _start_audit_trail(self) -> None:
        """Seal audit rows onto the hash chain (and forward them) on the scheduler."""
        trail = AuditTrail(self.config.audit, self.db, source_id=self.config.dicom.ae_title)
        trail.tick()  # rows written while the node was down (CLI commands)
        self.scheduler.add_job(trail.tick, "interval", seconds=self.config.audit.seal_interval_s,
                               id="audit-seal", max_instances=1, coalesce=True,
                               replace_existing=True)
        self._audit_trail = trail

    def _start_dispatch(self, services: Services) -> float:
        """Celery dispatch (``queue.broker_url``): jobs go to ``ainode worker --celery``
        processes instead of the local worker; returns the sweep's interval."""
        from node.queue import Publisher, celery_app
        from storage import workers as worker_rows
        from storage.jobs import new_worker_id

        publisher = Publisher(celery_app(self.config), self.db, self.config)
        services.publisher = publisher
        # The node's own row: a Celery worker on SQLite checks it is on the same host.
        self._node_name = new_worker_id()
        worker_rows.register(self.db, self._node_name, kind="node", device="-",
                             queues=[])
        self.scheduler.add_job(worker_rows.record_heartbeat, "interval", seconds=10.0,
                               args=(self.db, self._node_name), id="node-heartbeat",
                               max_instances=1, coalesce=True, replace_existing=True)
        log.info("jobs dispatched through the broker", extra={
            "broker": _safe_broker(self.config.queue.broker_url or "")})
        return self.config.queue.sweep_interval_s

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let stores in flight finish, stop workers, then the scheduler.

        A job still running on the local worker after ``grace_s`` is abandoned
        with the process; its lease makes the next start requeue it.
        """
        self._jobs_stop.set()
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.receivers.stop(grace_s)
        if self._jobs_thread is not None:
            self._jobs_thread.join(timeout=grace_s)
            self._jobs_thread = None
        # Stopping anyway: if this fails, status reports the beat as stale instead.
        with contextlib.suppress(NodeError, SQLAlchemyError):
            heartbeat.stopped(self.db)
        if self._audit_trail is not None:
            self._audit_trail.tick()  # the last rows, sealed before the process ends
            self._audit_trail.close()
            self._audit_trail = None
        if self._node_name is not None:
            from storage import workers as worker_rows

            try:
                worker_rows.set_stopped(self.db, self._node_name)
            except Exception as exc:  # a report only; the node stops either way
                log.warning("node state not recorded", extra={"error": str(exc)})
        self.db.dispose()
        log.info("node stopped")

    def worker_pids(self) -> list[int]:
        return self.receivers.pids()


def _safe_broker(url: str) -> str:
    """The broker URL without its password (secrets never logged)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
