"""Connection rate limit per calling host, applied where connections are accepted.

Why before any association exists: a host opening connections as fast as it
can would otherwise cost the node a thread, a pynetdicom association and an
audit row per attempt. Over its rate, a connection gets an A-ASSOCIATE-RJ
(rejected-transient, service provider, local limit exceeded: "try later") on a
short-lived thread, after its A-ASSOCIATE-RQ has been read (bounded in size
and time), so the sender sees the reason rather than a reset. The refusals of
one host are audited once per ``audit_every_s`` with their count, so a flood
does not become a flood of audit rows.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HostRateLimiter", "refuse"]

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: type 3, reserved, length 4, reserved, result 2 (transient),
# source 3 (service provider, presentation related), reason 2 (local limit exceeded).
REJECT_LOCAL_LIMIT = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x02, 0x03, 0x02)
_MAX_RQ = 1 << 16


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    refused: int = 0
    audited_at: float = 0.0


class HostRateLimiter:
    """A token bucket per host: ``per_minute`` connections, a burst of as many."""

    def __init__(self, per_minute: int, *, audit: Callable[[str, int], None] | None = None,
                 audit_every_s: float = 10.0) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self._audit = audit
        self._audit_every_s = audit_every_s
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, host: str) -> bool:
        now = time.monotonic()
        report: int | None = None
        with self._lock:
            b = self._buckets.get(host)
            if b is None:
                if len(self._buckets) > 10000:  # forget quiet hosts (memory stays bounded)
                    self._buckets = {h: v for h, v in self._buckets.items()
                                     if now - v.stamp < 120}
                b = self._buckets[host] = _Bucket(self.burst, now)
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return True
            b.refused += 1
            if now - b.audited_at >= self._audit_every_s:
                report, b.refused, b.audited_at = b.refused, 0, now
        if report is not None and self._audit is not None:
            self._audit(host, report)
        return False


def refuse(sock: socket.socket, *, timeout_s: float = 2.0) -> None:
    """Read the A-ASSOCIATE-RQ (bounded), answer A-ASSOCIATE-RJ, close; never raises."""
    deadline = time.monotonic() + timeout_s
    try:
        header = b""
        while len(header) < 6 and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return
            header += chunk
        if len(header) == 6 and header[0] == 0x01:
            left = min(struct.unpack(">L", header[2:6])[0], _MAX_RQ)
            while left > 0 and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(min(left, 8192))
                if not chunk:
                    return
                left -= len(chunk)
            sock.sendall(REJECT_LOCAL_LIMIT)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            while sock.recv(4096):  # until the peer closes (no reset for unread bytes)
                pass
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
