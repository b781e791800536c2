"""The real node as a subprocess (`ainode serve`), as an admin would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from storage.db import Database
from tests.support.markers import peer_entry
from tests.support.net import free_port, wait_for
from tests.support.peers import dcmtk_env, require

__all__ = ["AINODE", "CALLERS", "REPO", "STABLE_AGE_S", "NodeProc", "echo_ok", "start_node"]

REPO = Path(__file__).resolve().parents[2]
AINODE = [sys.executable, "-m", "node"]
STABLE_AGE_S = 1.5
CALLERS = ["STORESCU", "ECHOSCU", "PYSENDER"]


@dataclass
class NodeProc:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    config: Path
    log: Path
    database_url: str | None = None  # None: the embedded SQLite in the data directory

    @property
    def db(self) -> Database:
        return Database(self.database_url or f"sqlite:///{self.data_dir / 'ainode.db'}")

    def kill_all(self) -> None:
        """SIGKILL the whole node (parent and receiver workers), like a power cut."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                raise
        return self.proc.returncode

    def ainode(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AINODE, "--config", str(self.config), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)


@peer_entry("echoscu")
def echo_ok(port: int, aet: str = "ECHOSCU") -> bool:
    r = subprocess.run([require("echoscu"), "-aet", aet, "-aec", "AINODE", "127.0.0.1",
                        str(port)], env=dcmtk_env(), capture_output=True, timeout=30)
    return r.returncode == 0


@peer_entry("`ainode serve` as a subprocess (probed with echoscu)")
def start_node(tmp: Path, *, min_free_mb: int = 0, workers: int = 2,
               data_dir: Path | None = None, port: int | None = None,
               callers: list[str] | None = None, stable_age_s: float = STABLE_AGE_S,
               extra: dict[str, Any] | None = None, serve_args: tuple[str, ...] = (),
               ready_timeout: float = 90, config_after: bool = False,
               database_url: str | None = None) -> NodeProc:
    """Start `ainode serve` with a config written for this test; returns once it answers echo.

    ``extra`` adds top-level config sections (e.g. destinations); ``serve_args``
    adds `ainode serve` options (e.g. --no-jobs); ``config_after`` passes
    ``--config`` after ``serve`` instead of before it; ``database_url`` puts the
    node on that database (a PostgreSQL one, say) instead of the data directory's
    SQLite.
    """
    data_dir = data_dir or tmp / "node-data"
    port = port or free_port()
    cfg = tmp / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port,
                  # ECHOSCU: the readiness probe below.
                  "allowed_callers": sorted({*(callers or CALLERS), "ECHOSCU"})},
        "storage": {"data_dir": str(data_dir), "min_free_mb": min_free_mb,
                    **({"database_url": database_url} if database_url else {})},
        "series": {"stable_age_s": stable_age_s},
        "logging": {"level": "INFO"},
        **(extra or {}),
    }))
    log = tmp / f"node-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        serve = ["serve", "--workers", str(workers), *serve_args]
        args = [*serve, "--config", str(cfg)] if config_after else ["--config", str(cfg), *serve]
        proc = subprocess.Popen([*AINODE, *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    node = NodeProc(proc, port, data_dir, cfg, log, database_url)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited {proc.returncode}: {log.read_text()[-3000:]}")
        return "listening" in log.read_text() and echo_ok(port)

    try:
        wait_for(ready, timeout=ready_timeout, what="ainode serve to listen")
    except BaseException:
        if proc.poll() is None:  # never leave a node running behind a failed start
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        raise
    return node


