"""The C-STORE / C-ECHO client (pynetdicom), with TCP_NODELAY on its socket.

Why TCP_NODELAY: pynetdicom sends each PDU with separate small writes and
does not disable Nagle's algorithm; against dcmtk or Orthanc (delayed ACKs)
every P-DATA then waits ~40 ms, making a send 3-4x slower. The option is set
on the socket pynetdicom creates, before it connects, so it also holds when
TLS wraps that socket.

Everything pynetdicom can raise or report (refused, aborted, timed out, an
empty status) is turned into a TransferError or a status here, where it enters.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.network.tls import client_context
from storage.errors import TransferError

__all__ = ["Peer", "associate", "echo_peer", "store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where to send: a destination resolved against the node's own settings."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    tls: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    key_password: str | None = field(default=None, repr=False)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0


class _NoDelayAE(AE):
    """An AE whose association sockets have TCP_NODELAY set (see module docstring)."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _tls_context(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    if not peer.tls:
        return None
    ctx = client_context(peer.ca_file, peer.cert_file, peer.key_file, peer.key_password)
    return ctx, peer.host


def contexts_for(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """One context per SOP class sent, offering the file's own syntax and the two LE ones."""
    syntaxes: dict[str, list[str]] = {}
    for ds in datasets:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")
                 or ExplicitVRLittleEndian)
        offered = syntaxes.setdefault(str(ds.SOPClassUID), [])
        for uid in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in offered:
                offered.append(uid)
    if len(syntaxes) > 128:
        raise TransferError("more than 128 SOP classes in one batch")
    return [build_context(UID(cls), [UID(t) for t in ts]) for cls, ts in syntaxes.items()]


@contextmanager
def associate(peer: Peer, contexts: Sequence[PresentationContext]) -> Iterator[Association]:
    """An established association, released on exit; TransferError if none could be made."""
    ae = _NoDelayAE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.acse_timeout_s
    ae.dimse_timeout = peer.dimse_timeout_s
    ae.network_timeout = peer.network_timeout_s
    ae.connection_timeout = peer.connect_timeout_s
    try:
        tls_args = _tls_context(peer)
    except (OSError, ssl.SSLError) as exc:
        raise TransferError(f"{peer.name}: TLS set-up failed: {exc}") from exc
    try:
        assoc = ae.associate(peer.host, peer.port, contexts=list(contexts),
                             ae_title=peer.ae_title, tls_args=tls_args)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TransferError(f"{peer.name}: cannot associate: {exc}") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected"
        elif assoc.is_aborted:
            # pynetdicom reports a refused TCP connection as an abort too.
            why = "connection refused, or association aborted"
        else:
            why = "connection failed or timed out"
        ae.shutdown()
        raise TransferError(f"{peer.name}: {why} ({peer.host}:{peer.port} {peer.ae_title})")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def store(assoc: Association, ds: Dataset) -> int | None:
    """C-STORE one dataset; the DIMSE status, or None when the peer gave none.

    A missing status (abort, timeout, no accepted context) is a failure; the
    caller records it and retries later.
    """
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError, AttributeError) as exc:
        log.warning("C-STORE could not be sent: %s", exc,
                    extra={"sop_instance_uid": str(ds.get("SOPInstanceUID", ""))})
        return None
    if not status or "Status" not in status:
        return None
    return int(status.Status)


def echo_peer(peer: Peer) -> int:
    """C-ECHO ``peer``; its status (0 = success). TransferError when it cannot be reached."""
    with associate(peer, [build_context(Verification)]) as assoc:
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise TransferError(f"{peer.name}: no C-ECHO response")
        return int(status.Status)
