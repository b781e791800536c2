"""``ainode worker --celery``: the checks before a worker may start, and its life.

What a worker on another machine needs, and refuses to start without:

* a broker whose message limit outlasts a job (node.queue.app.check_broker_limits);
* a database every host can share. SQLite is a file: over NFS its locking is
  not safe, and a worker on another host would see another file or corrupt
  the one it shares. So with SQLite a Celery worker starts only next to the
  node (the broker on loopback, and the node, if it ran, on this host);
  otherwise it says to use PostgreSQL;
* the node's ``storage.data_dir`` on a shared filesystem (README, "Several
  machines"): the spool it reads, the results it writes (atomically: temp
  file, fsync, rename; storage.filestore).

One process per device; ``--concurrency`` jobs at a time on it, on Celery's
thread pool (the job itself runs on node.worker's supervised thread, which
renews the lease and enforces the time limit).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from sqlalchemy import select

from node.config import NodeConfig
from node.jobs import resolve_device
from node.queue.app import celery_app, check_broker_limits
from node.queue.publish import Publisher
from node.queue.task import CeleryRunner, register_task
from storage import workers as worker_rows
from storage.db import Database
from storage.errors import ConfigError
from storage.filestore import FileStore
from storage.models import WorkerState

__all__ = ["check_shared_database", "run_celery_worker", "worker_config"]

log = logging.getLogger(__name__)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or "localhost"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_shared_database(db: Database, config: NodeConfig) -> None:
    """Refuse SQLite for a worker that may be on another host than the node (ConfigError)."""
    if not db.is_sqlite:
        return
    why = ("SQLite is a local file; workers on other hosts need a database they can share: "
           "set storage.database_url to PostgreSQL (README, \"Several machines\")")
    url = config.queue.broker_url or ""
    if not _loopback(url):
        raise ConfigError(f"a Celery worker with its broker on another host "
                          f"({urlsplit(url).hostname}) cannot use SQLite: {why}")
    me = socket.gethostname()
    with db.session() as session:
        hosts = set(session.scalars(select(WorkerState.host).where(WorkerState.kind == "node")))
    others = sorted(h for h in hosts if h != me)
    if others:
        raise ConfigError(f"this SQLite database belongs to the node on {', '.join(others)}, "
                          f"not this host ({me}): {why}")


def worker_config(config: NodeConfig, device: str | None) -> NodeConfig:
    """The config this worker runs jobs with: its own device, if given."""
    if device is None:
        return config
    copy = config.model_copy(deep=True)
    copy.inference.device = device
    return copy


def run_celery_worker(config: NodeConfig, db: Database, store: FileStore, *,
                      queues: Sequence[str], device: str | None, concurrency: int | None,
                      loglevel: str = "INFO") -> None:
    """Check, register, then consume ``queues`` until Celery's warm shutdown (SIGTERM)."""
    check_broker_limits(config)
    check_shared_database(db, config)
    config = worker_config(config, device)
    resolved = resolve_device(config.inference.device)
    config.inference.device = resolved
    n = concurrency or config.inference.max_jobs_per_device
    app = celery_app(config)
    publisher = Publisher(app, db, config, actor="worker")
    runner = CeleryRunner(db, store, config, publisher, concurrency=n,
                          lease_s=config.queue.lease_s)
    register_task(app, runner)
    worker_rows.register(db, runner.name, kind="celery", device=resolved, queues=list(queues))
    requeued = runner.worker.recover()
    if requeued:
        publisher.publish(requeued, "requeued")
    stop = threading.Event()
    worker_rows.heartbeat_forever(db, runner.name, stop)
    log.info("celery worker starting", extra={"worker": runner.name, "device": resolved,
                                              "queues": list(queues), "concurrency": n})
    node = f"ainode-{resolved.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"
    try:
        app.Worker(hostname=node, queues=list(queues), concurrency=n, pool_cls="threads",
                   task_events=True, without_gossip=True, without_mingle=True,
                   loglevel=loglevel, quiet=True).start()
    finally:
        stop.set()
        worker_rows.set_stopped(db, runner.name)
        log.info("celery worker stopped", extra={"worker": runner.name})
