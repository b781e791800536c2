"""Raw DICOM upper-layer PDUs for tests that must send what a polite client never would
(floods, trickles, malformed PDUs): built with pynetdicom's encoders, sent on plain sockets."""

from __future__ import annotations

import socket
import struct

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

__all__ = ["RELEASE_RQ", "associate_rq", "read_pdu"]

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RELEASE_RQ = bytes.fromhex("0500000000040000 0000".replace(" ", ""))


def associate_rq(calling: str, called: str = "AINODE",
                 abstract: tuple[str, ...] = (VERIFICATION,),
                 transfer: str = "1.2.840.10008.1.2.1") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing each of ``abstract`` with ``transfer``."""
    p = A_ASSOCIATE()
    p.application_context_name = "1.2.840.10008.3.1.1.1"
    p.calling_ae_title = calling
    p.called_ae_title = called
    contexts = []
    for i, uid in enumerate(abstract):
        cx = build_context(uid, [transfer])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    p.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16382
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1.19"
    p.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(p)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU (header and body); b"" when the peer closed first."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return header
        header += chunk
    (length,) = struct.unpack(">L", header[2:6])
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            break
        body += chunk
    return header + body
