"""The node process's sign of life, for ``ainode status``: is the node up right now?

Why a row and not only a port probe: a port can be open with the scheduler
stuck (nothing routed, nothing sent), and a stopped node leaves no open port
to ask about. ``ainode serve`` beats every :data:`INTERVAL_S` seconds from its
scheduler, with the port and receiver processes in the details, and marks the
row stopped on a clean shutdown; ``status`` calls a node up when a beat is
fresh and the port answers.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import NodeHeartbeat, utcnow

__all__ = ["INTERVAL_S", "NodeState", "beat", "listening", "node_state", "stopped"]

INTERVAL_S = 5.0
STALE_AFTER_S = 3 * INTERVAL_S  # three missed beats: the scheduler is gone or stuck


def _row(session: Session, component: str) -> NodeHeartbeat:
    host, pid = socket.gethostname(), os.getpid()
    row = session.scalars(select(NodeHeartbeat).where(
        NodeHeartbeat.component == component, NodeHeartbeat.host == host,
        NodeHeartbeat.pid == pid)).first()
    if row is None:
        row = NodeHeartbeat(component=component, host=host, pid=pid, started_at=utcnow(),
                            details={})
        session.add(row)
    return row


def beat(db: Database, component: str = "scheduler", **details: Any) -> None:
    """Record that ``component`` of this process is alive now."""
    with db.session() as s:
        row = _row(s, component)
        row.last_seen_at = utcnow()
        row.stopped_at = None
        if details:
            row.details = {**(row.details or {}), **details}


def stopped(db: Database, component: str = "scheduler") -> None:
    """A clean shutdown: ``status`` then says stopped, not "silent since"."""
    with db.session() as s:
        row = _row(s, component)
        row.stopped_at = utcnow()


def listening(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port (the receivers' socket)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((target, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class NodeState:
    up: bool
    summary: str  # one line for people
    last_heartbeat_at: datetime | None
    port_listening: bool
    details: dict[str, Any]


def node_state(session: Session, host: str, port: int, *,
               now: datetime | None = None) -> NodeState:
    """Up, stopped, or silent, from the newest scheduler beat and a probe of the port."""
    now = now or utcnow()
    row = session.scalars(select(NodeHeartbeat).where(NodeHeartbeat.component == "scheduler")
                          .order_by(NodeHeartbeat.last_seen_at.desc()).limit(1)).first()
    port = int((row.details or {}).get("port", port)) if row is not None else port
    open_ = listening(host, port)
    where = f"{host}:{port}"
    if row is None:
        return NodeState(False, f"down: no node has run on this database; port {where} "
                         + ("answers (another program?)" if open_ else "closed"),
                         None, open_, {})
    age = (now - row.last_seen_at).total_seconds()
    info = {"host": row.host, "pid": row.pid, **(row.details or {})}
    if row.stopped_at is not None:
        text = f"down: stopped at {row.stopped_at.isoformat(timespec='seconds')}"
        return NodeState(False, text, row.last_seen_at, open_, info)
    if age > STALE_AFTER_S:
        text = (f"down or stuck: last scheduler heartbeat {age:.0f} s ago "
                f"(pid {row.pid} on {row.host}); port {where} "
                + ("answers" if open_ else "closed"))
        return NodeState(False, text, row.last_seen_at, open_, info)
    if not open_:
        return NodeState(False, f"degraded: scheduler alive ({age:.0f} s ago) but port "
                         f"{where} closed", row.last_seen_at, open_, info)
    receivers = info.get("receivers")
    text = (f"up: receivers listening on {where}"
            + (f" ({receivers} process(es))" if receivers else "")
            + f", scheduler heartbeat {age:.0f} s ago (pid {row.pid} on {row.host})")
    return NodeState(True, text, row.last_seen_at, open_, info)


def stale_before(now: datetime) -> datetime:
    return now - timedelta(seconds=STALE_AFTER_S)
