"""Start the machine's PostgreSQL, RabbitMQ and Redis when not running (CI starts cold).

Run as ``python -m tests.support.services`` from the Makefile; the fixtures
call :func:`ensure_postgres` too, so a test run never depends on the order.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["POSTGRES_ADMIN_URL", "RABBITMQ_PORT", "REDIS_PORT", "ensure_postgres",
           "ensure_rabbitmq", "ensure_redis", "fresh_postgres_database", "port_open",
           "rabbitmqctl"]

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_ADMIN_URL = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def fresh_postgres_database(admin: Any, prefix: str = "ainode_test") -> Iterator[str]:
    """The URL of a new, empty database on the machine's server, dropped (forcibly)
    afterwards; ``admin`` is a ``storage.db.Database`` on ``POSTGRES_ADMIN_URL``."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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


RABBITMQ_PORT = 5672
REDIS_PORT = 6379


def _wait_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(POSTGRES_HOST, port):
            return True
        time.sleep(0.5)
    return False


def rabbitmqctl(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The broker's own admin tool (vhosts, permissions, stop_app/start_app)."""
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def ensure_rabbitmq(timeout_s: float = 90.0) -> bool:
    """True once RabbitMQ accepts AMQP on 127.0.0.1:5672, starting it if needed
    (``rabbitmqctl start_app`` first: a test that stopped the app and died leaves that)."""
    if port_open(POSTGRES_HOST, RABBITMQ_PORT):
        return True
    if rabbitmqctl("start_app", timeout_s=timeout_s).returncode != 0:
        if shutil.which("service"):
            subprocess.run(["service", "rabbitmq-server", "start"], capture_output=True,
                           timeout=timeout_s, check=False)
        elif shutil.which("rabbitmq-server"):
            subprocess.run(["rabbitmq-server", "-detached"], capture_output=True,
                           timeout=timeout_s, check=False)
    return _wait_port(RABBITMQ_PORT, timeout_s)


def ensure_redis(timeout_s: float = 30.0) -> bool:
    """True once Redis answers on 127.0.0.1:6379, starting it if needed."""
    if port_open(POSTGRES_HOST, REDIS_PORT):
        return True
    if shutil.which("redis-server"):
        subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
                        "--daemonize", "yes"], capture_output=True, timeout=timeout_s,
                       check=False)
    return _wait_port(REDIS_PORT, timeout_s)


if __name__ == "__main__":
    for name, ensure, where in (("postgresql", ensure_postgres, POSTGRES_PORT),
                                ("rabbitmq", ensure_rabbitmq, RABBITMQ_PORT),
                                ("redis", ensure_redis, REDIS_PORT)):
        ok = ensure()
        print(f"{name} on {POSTGRES_HOST}:{where}: {'up' if ok else 'NOT AVAILABLE'}")
