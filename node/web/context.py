"""What the web app is given: the node's config, database, file store and liveness probes.

Why one object passed in (``app.state.ctx``) rather than globals: the same
app runs inside ``ainode serve`` (where the service knows whether its
receiver processes and job worker live) and alone as ``ainode web`` (where a
TCP probe of the DICOM port stands in), and each test builds its own.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeConfig
from storage.audit import audit
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import Ingestor

__all__ = ["WebContext", "port_listening"]


def port_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class WebContext:
    config: NodeConfig
    db: Database
    store: FileStore
    # Whether the C-STORE receivers listen / the local job worker runs; None: not known here.
    receivers_alive: Callable[[], bool] | None = None
    workers_alive: Callable[[], dict[str, bool]] | None = None
    _ingestor: Ingestor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, config: NodeConfig) -> WebContext:
        s = config.storage
        return cls(config, Database(s.effective_database_url),
                   FileStore(s.data_dir, spool_dir=s.spool_dir, results_dir=s.results_dir,
                             min_free_mb=s.min_free_mb))

    @property
    def ingestor(self) -> Ingestor:
        """STOW-RS's way in: the very Ingestor the C-STORE receivers use (own commit thread)."""
        with self._lock:
            if self._ingestor is None:
                self._ingestor = Ingestor(self.db, self.store)
            return self._ingestor

    @property
    def cache_dir(self) -> Path:
        return self.config.storage.data_dir / "web-cache"

    def receivers_listening(self) -> bool:
        if self.receivers_alive is not None:
            return self.receivers_alive()
        d = self.config.dicom
        return port_listening("127.0.0.1" if d.host in ("0.0.0.0", "") else d.host, d.port)

    def audit_login(self, username: str, host: str, *, ok: bool, via: str,
                    event: str | None = None) -> None:
        try:
            with self.db.session() as s:
                audit(s, event or ("user.login" if ok else "user.login_failed"),
                      outcome="success" if ok else "failure", actor=username[:128], host=host,
                      via=via)
        except SQLAlchemyError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._ingestor is not None:
                self._ingestor.close()
                self._ingestor = None
