"""An extra receiver process: ``python -m node.network.worker`` (started by node.network.pool).

Why processes: pynetdicom's receive path is pure Python and holds the GIL,
so one process uses one core however many associations it runs. An extra
receiver listens on nothing: the main process accepts each connection and
passes it here when this process is the least busy (node.network.dispatch).
Each process has its own AE, database engine and file store handle; they
share the spool and the database, whose writes are atomic and transactional,
so nothing else needs coordinating between them.

Protocol with the parent: the config arrives as JSON on stdin with the file
descriptor of this process's end of the dispatch channel; the worker prints
``ready <pid>`` on stdout once it can serve; SIGTERM (or the parent going
away: its end of the channel closes) stops it after the associations in
flight have finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading

from node import logs
from node.config import NodeConfig
from node.network.dispatch import ended, serve_channel
from node.network.scp import Receiver, ReceiverSettings
from node.secrets import secrets_of
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import Ingestor

__all__ = ["main", "run_worker"]

log = logging.getLogger(__name__)


def run_worker(config: NodeConfig, channel: socket.socket, stop: threading.Event,
               parent_pid: int) -> None:
    """Serve what the parent passes until ``stop`` is set or the parent process is gone."""
    s = config.storage
    db = Database(s.effective_database_url)
    store = FileStore(s.data_dir, spool_dir=s.spool_dir, results_dir=s.results_dir,
                      min_free_mb=s.min_free_mb)
    settings = ReceiverSettings.from_config(config.dicom)
    ingestor = Ingestor(db, store)
    receiver = Receiver(settings, ingestor, adopt_only=True, on_end=lambda: ended(channel))
    receiver.start()
    threading.Thread(target=serve_channel, args=(channel, receiver.adopt, stop.set),
                     name="dispatch-channel", daemon=True).start()
    print(f"ready {os.getpid()}", flush=True)
    try:
        while not stop.wait(0.5):
            if os.getppid() != parent_pid:
                log.warning("parent process gone: receiver worker stopping")
                break
    finally:
        receiver.stop()
        ingestor.close()
        db.dispose()


def main() -> None:
    request = json.loads(sys.stdin.readline())
    config = NodeConfig.model_validate(request["config"])
    lc = config.logging
    logs.configure(lc.level, lc.format, lc.file, secrets=secrets_of(config))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = socket.socket(fileno=int(request["channel_fd"]))
    run_worker(config, channel, stop, int(request["parent_pid"]))


if __name__ == "__main__":
    main()
