"""The node's receivers: the one in this process, which owns the port, and the extra processes.

Why a pool: pynetdicom's receive path holds the GIL, so one process serves
one core. The main receiver accepts every connection and, with more than one
process, the dispatcher hands each to the least busy (node.network.dispatch);
the extra receivers are ``python -m node.network.worker`` children.

``dicom.max_associations`` is the node's limit: each process takes its share
(the dispatcher keeps them evenly loaded), and a process at its share refuses
the association as pynetdicom does (A-ASSOCIATE-RJ, transient). The extra
processes start first, so the port opens only when all of them can serve.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace

from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from node.network.dispatch import Dispatcher, channel_pair
from node.network.scp import Receiver, ReceiverSettings
from storage.audit import audit
from storage.db import Database
from storage.errors import ConfigError, StorageError
from storage.filestore import FileStore
from storage.ingest import Ingestor

__all__ = ["ReceiverPool", "default_workers"]

log = logging.getLogger(__name__)

_WORKER_START_TIMEOUT_S = 60.0


def default_workers() -> int:
    """One receiver process per core, at most 8.

    Why by cores: on a small host the node shares the cores with its own job
    worker (inference) and the database; four processes on two cores cost
    200-400 MB and compete with inference for no gain an admin would see. A
    receiver spends much of each store waiting on the disk, so on 2 cores 4
    processes measured a faster burst ingest (bench_ingest: 1.07 of Orthanc's
    rate against 0.73 with 2; bench/RESULTS.md); ``--workers 4`` still buys it.
    """
    return max(1, min(8, os.cpu_count() or 1))


class ReceiverPool:
    """``workers`` receiver processes in all: this one and ``workers - 1`` children."""

    def __init__(self, config: NodeConfig, db: Database, store: FileStore, *,
                 workers: int = 1) -> None:
        if workers < 1:
            raise ConfigError("workers must be at least 1")
        self.config = config
        self.db = db
        self.store = store
        self.workers = workers
        self._receiver: Receiver | None = None
        self._dispatcher: Dispatcher | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    @property
    def port(self) -> int:
        if self._receiver is None:
            raise RuntimeError("receivers not started")
        return self._receiver.port

    def share(self) -> int:
        """Each process's part of ``dicom.max_associations`` (rounded up)."""
        return max(1, -(-self.config.dicom.max_associations // self.workers))

    def start(self) -> None:
        """The children first, then the main receiver: the port opens when all can serve."""
        settings = replace(ReceiverSettings.from_config(self.config.dicom),
                           max_associations=self.share())
        self._dispatcher = Dispatcher() if self.workers > 1 else None
        try:
            for _ in range(self.workers - 1):
                self._children.append(self._spawn())
            self._receiver = Receiver(settings, Ingestor(self.db, self.store),
                                      dispatcher=self._dispatcher)
            self._receiver.start()
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> subprocess.Popen[bytes]:
        assert self._dispatcher is not None
        ours, theirs = channel_pair()
        config = self.config.model_dump(mode="json")
        config["dicom"]["max_associations"] = self.share()
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

    def replace_dead(self) -> list[int]:
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
                self._children[i] = self._spawn()
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
        """Stop accepting, let stores in flight finish (here and in the children), reap them."""
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
            self._dispatcher = None

    def pids(self) -> list[int]:
        """The extra receiver processes alive now."""
        return [p.pid for p in self._children if p.poll() is None]
