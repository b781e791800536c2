"""Handing accepted DICOM connections to receiver processes, the least busy first.

Why not SO_REUSEPORT (the first design): the kernel picks the listening
socket by a hash of the connection's addresses, not by load. Measured with
four storescu senders and two receiver processes, all four associations
landed in one process in three runs out of four, and that process (one GIL)
ran at about half the speed of a 2 + 2 split. Here the node's main process
accepts every connection and passes the socket (SCM_RIGHTS over a Unix
``SOCK_SEQPACKET`` pair) to the receiver process with the fewest running
associations, ties going to the extra processes so that the main one, which
also runs the scheduler and jobs, takes a connection only when it is the
least busy. Each receiver process sends one byte back when an association
ends, which is how the counts stay true.

TLS: the socket is passed before the handshake; the process that serves the
association wraps it (the TLS state could not cross processes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Dispatcher", "channel_pair", "ended", "serve_channel"]

log = logging.getLogger(__name__)

_ENDED = b"-"
_MAX_MSG = 512


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the main process's end, the receiver process's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


@dataclass(eq=False)
class _Peer:
    channel: socket.socket
    pid: int
    active: int = 0
    alive: bool = True
    reader: threading.Thread | None = field(default=None, repr=False)


class Dispatcher:
    """The main process's side: chooses where each accepted connection is served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: list[_Peer] = []
        self._local = 0

    def add(self, channel: socket.socket, pid: int) -> None:
        peer = _Peer(channel, pid)
        peer.reader = threading.Thread(target=self._read, args=(peer,),
                                       name=f"dispatch-{pid}", daemon=True)
        with self._lock:
            self._peers = [p for p in self._peers if p.alive]  # forget dead processes
            self._peers.append(peer)
        peer.reader.start()

    def counts(self) -> dict[str, int]:
        """Running associations per process (``main`` and each receiver pid)."""
        with self._lock:
            return {"main": self._local, **{str(p.pid): p.active for p in self._peers
                                            if p.alive}}

    def hand_over(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Pass ``sock`` to the least busy receiver process; False: serve it here.

        On True the caller closes its own copy of the socket (close, never
        shutdown: the connection lives on in the other process).
        """
        with self._lock:
            while True:
                alive = [p for p in self._peers if p.alive]
                best = min(alive, key=lambda p: p.active, default=None)
                if best is None or best.active > self._local:
                    self._local += 1
                    return False
                try:
                    socket.send_fds(best.channel, [json.dumps(list(address[:2])).encode()],
                                    [sock.fileno()])
                except OSError:
                    log.warning("receiver process unreachable; not sending it connections",
                                extra={"pid": best.pid})
                    best.alive = False
                    continue
                best.active += 1
                return True

    def local_done(self) -> None:
        with self._lock:
            self._local = max(0, self._local - 1)

    def close(self) -> None:
        with self._lock:
            peers, self._peers = self._peers, []
        for p in peers:
            p.alive = False
            # shutdown() first: it wakes the reader thread blocked in recv() and
            # tells the receiver process (close() alone would do neither).
            with contextlib.suppress(OSError):
                p.channel.shutdown(socket.SHUT_RDWR)
            p.channel.close()

    def _read(self, peer: _Peer) -> None:
        while True:
            try:
                msg = peer.channel.recv(_MAX_MSG)
            except OSError:
                msg = b""
            if not msg:
                with self._lock:
                    peer.alive = False
                return
            with self._lock:
                peer.active = max(0, peer.active - msg.count(_ENDED))


def serve_channel(channel: socket.socket,
                  adopt: Callable[[socket.socket, tuple[str, int]], None],
                  gone: Callable[[], None]) -> None:
    """A receiver process's side: adopt every connection the main process passes.

    Returns (after calling ``gone``) when the main process closes its end.
    """
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(channel, _MAX_MSG, 1)
        except OSError:
            msg, fds = b"", []
        if not msg and not fds:
            gone()
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            try:
                host, port = json.loads(msg)
                adopt(sock, (str(host), int(port)))
            except Exception:
                log.exception("could not adopt a passed connection")
                sock.close()
                ended(channel)


def ended(channel: socket.socket) -> None:
    """Tell the main process one association of this process has ended."""
    with contextlib.suppress(OSError):  # the main process is gone; the receiver stops too
        channel.send(_ENDED)
