"""The node's side of the tamper-evident audit trail: seal, checkpoint, forward.

Why a scheduler task: rows are sealed onto the hash chain a moment after
they commit (storage.audit_chain says why not at insert), checkpoints are
written on a clock, and forwarding to a syslog collector must never hold up
the transaction that wrote the row; a collector that is down only delays
forwarding (the cursor in ``audit_cursors`` says how far it got).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from node.audit_atna import audit_message
from node.config import AuditConfig, SyslogConfig
from storage.audit_chain import seal
from storage.db import Database
from storage.models import AuditCursor, AuditEvent

__all__ = ["AuditTrail", "SyslogTLS", "rfc5424"]

log = logging.getLogger(__name__)

_FIELDS = ("id", "ts", "event", "outcome", "actor", "host", "study_uid", "series_uid",
           "sop_instance_uid", "job_id", "details")
_CURSOR = "syslog"
# Facility 10 (security/authorization), severity 5 notice / 4 warning (RFC 5424 6.2.1).
_PRI = {"success": 10 * 8 + 5, "warning": 10 * 8 + 4, "failure": 10 * 8 + 4}


def row_dict(row: AuditEvent) -> dict[str, Any]:
    return {f: getattr(row, f) for f in _FIELDS}


def rfc5424(row: dict[str, Any], *, app_name: str, hostname: str, source_id: str) -> bytes:
    """One syslog message (RFC 5424) whose MSG is the row's DICOM audit message (XML)."""
    from xml.etree import ElementTree as ET

    ts = row["ts"]
    stamp = ts.isoformat(timespec="microseconds") if isinstance(ts, datetime) else str(ts)
    pri = _PRI.get(str(row.get("outcome")), 10 * 8 + 5)
    xml = ET.tostring(audit_message(row, source_id=source_id), encoding="utf-8")
    header = f"<{pri}>1 {stamp} {hostname} {app_name} - IHE+RFC-3881 - "
    return header.encode() + b"\xef\xbb\xbf" + xml  # BOM: MSG is UTF-8 (RFC 5424 6.4)


class SyslogTLS:
    """A TLS connection to a syslog collector, RFC 5425 octet-counted frames."""

    def __init__(self, cfg: SyslogConfig, *, timeout_s: float = 5.0) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self._sock: ssl.SSLSocket | None = None

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cfg.cert_file is not None and self.cfg.key_file is not None:
            ctx.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file))
        return ctx

    def send(self, messages: Iterable[bytes]) -> None:
        if self._sock is None:
            raw = socket.create_connection((self.cfg.host, self.cfg.port), timeout=self.timeout_s)
            try:
                self._sock = self._context().wrap_socket(raw, server_hostname=self.cfg.host)
            except BaseException:
                raw.close()
                raise
        try:
            for msg in messages:
                self._sock.sendall(str(len(msg)).encode() + b" " + msg)
        except OSError:
            self.close()
            raise

    def close(self, linger_s: float = 2.0) -> None:
        """Close so that what was sent arrives: FIN first, then drain what the collector
        sent (TLS 1.3 session tickets). Closing with unread data would send a TCP reset,
        which makes the collector's kernel drop messages it had not read yet."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(linger_s)
            while sock.recv(4096):
                pass
        with contextlib.suppress(OSError):
            sock.close()


class AuditTrail:
    """Seals new audit rows, writes periodic checkpoints, forwards sealed rows to syslog."""

    def __init__(self, cfg: AuditConfig, db: Database, *, source_id: str) -> None:
        self.cfg = cfg
        self.db = db
        self.source_id = source_id
        self._key = cfg.key()
        self._last_checkpoint = time.monotonic()
        self._syslog = SyslogTLS(cfg.syslog) if cfg.syslog.enabled else None
        self._hostname = socket.gethostname()

    def tick(self) -> None:
        """One scheduler turn; never raises (a failure is logged and retried next turn)."""
        try:
            due = time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval_s
            # Batches of 1000, each its own short transaction: with SQLite the sealer
            # holds the write lock the receivers' commits also need.
            for _ in range(20):
                with self.db.session() as s:
                    done = seal(s, key=self._key, checkpoint_every=self.cfg.checkpoint_every,
                                checkpoint=due, batch=1000)
                if done.rows:
                    log.debug("audit rows sealed", extra={"rows": done.rows,
                                                          "chain_seq": done.head_seq})
                if done.rows < 1000:
                    break
            if due:
                self._last_checkpoint = time.monotonic()
        except Exception:
            log.exception("could not seal the audit trail (next turn retries)")
            return
        if self._syslog is not None:
            self.forward()

    def forward(self, batch: int = 500) -> int:
        """Send sealed rows past the syslog cursor; returns how many were sent."""
        assert self._syslog is not None
        sent = 0
        try:
            with self.db.session() as s:
                cursor = s.get(AuditCursor, _CURSOR)
                if cursor is None:
                    cursor = AuditCursor(name=_CURSOR, chain_seq=0)
                    s.add(cursor)
                rows = list(s.scalars(
                    select(AuditEvent).where(AuditEvent.chain_seq > cursor.chain_seq)
                    .order_by(AuditEvent.chain_seq).limit(batch)))
                if not rows:
                    return 0
                self._syslog.send(
                    rfc5424(row_dict(r), app_name=self.cfg.syslog.app_name,
                            hostname=self._hostname, source_id=self.source_id)
                    for r in rows)
                cursor.chain_seq = int(rows[-1].chain_seq or 0)
                sent = len(rows)
        except Exception as exc:  # the collector down or refusing: try again next turn
            log.warning("audit forwarding to syslog failed (next turn retries)",
                        extra={"error": str(exc)[:200]})
        return sent

    def close(self) -> None:
        if self._syslog is not None:
            self._syslog.close()
