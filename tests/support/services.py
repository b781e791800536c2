"""Start the machine's PostgreSQL when it is not running (CI starts from a cold machine).

Run as ``python -m tests.support.services`` from the Makefile; the fixtures
call :func:`ensure_postgres` too, so a test run never depends on the order.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["POSTGRES_ADMIN_URL", "ensure_postgres", "port_open"]

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_ADMIN_URL = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_postgres(timeout_s: float = 60.0) -> bool:
    """True once PostgreSQL accepts connections on 127.0.0.1:5432, starting it if needed."""
    if port_open(POSTGRES_HOST, POSTGRES_PORT):
        return True
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").is_dir() else []
    if versions and shutil.which("pg_ctlcluster"):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"],
            check=False, capture_output=True, timeout=timeout_s,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(POSTGRES_HOST, POSTGRES_PORT):
            return True
        time.sleep(0.5)
    return False


if __name__ == "__main__":
    ok = ensure_postgres()
    print(f"postgresql on {POSTGRES_HOST}:{POSTGRES_PORT}: {'up' if ok else 'NOT AVAILABLE'}")
