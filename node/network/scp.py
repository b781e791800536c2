"""The receiver: a pynetdicom AE whose C-STORE handler only persists.

The sender waits for our response while the handler runs, so the handler
does exactly what an acknowledgement promises and nothing more: hand the
bytes as received to ``storage.ingest.Ingestor`` (atomic fsynced file, row,
audit row, commit) and map the outcome to a DIMSE status. Series assembly,
routing and inference run elsewhere and read the database.

Dependencies are bound as handler arguments (pynetdicom's ``evt_handlers``
``(event, handler, [args])``), so two receivers in one test process never
share state.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node.config import CallerConfig, DicomConfig, TLSConfig
from node.network import status
from node.network.acl import AccessPolicy
from node.network.contexts import prefer_requestor_order, supported_contexts, syntax_table
from node.network.dispatch import Dispatcher
from node.network.ratelimit import HostRateLimiter, refuse
from node.network.reactor import (
    EventAssociation,
    encode_pdata_tf,
    handlers_bound,
    make_event_driven,
)
from node.network.tls import handshake_reason, server_context
from storage.audit import audit
from storage.db import Database
from storage.errors import ConfigError, ConflictError, InputError, OutOfSpaceError, StorageError
from storage.ingest import Ingestor, Peer
from storage.part10 import decode_store_request, encode_file_meta, store_response_command

__all__ = ["Receiver", "ReceiverSettings", "handle_echo", "handle_requested", "handle_store"]

log = logging.getLogger(__name__)
LOGGER = logging.getLogger("pynetdicom")

# pynetdicom's "standard" handlers format every PDU and DIMSE message for its
# debug log, bound to every association, and cost a few percent of a 512 KB
# C-STORE even when that logger is silent. The node logs what it did itself.
_config.LOG_HANDLER_LEVEL = "none"


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """The network half of the config, as one value passed to each receiver process."""

    ae_title: str = "AINODE"
    host: str = "127.0.0.1"
    port: int = 11112
    max_pdu: int = 0
    max_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_connections_per_host_per_minute: int = 0
    callers: tuple[CallerConfig, ...] = ()
    tls: TLSConfig = field(default_factory=TLSConfig)

    @classmethod
    def from_config(cls, dicom: DicomConfig) -> ReceiverSettings:
        return cls(
            ae_title=dicom.ae_title, host=dicom.host, port=dicom.port, max_pdu=dicom.max_pdu,
            max_associations=dicom.max_associations, acse_timeout_s=dicom.acse_timeout_s,
            dimse_timeout_s=dicom.dimse_timeout_s, network_timeout_s=dicom.network_timeout_s,
            max_connections_per_host_per_minute=dicom.max_connections_per_host_per_minute,
            callers=tuple(dicom.allowed_callers), tls=dicom.tls,
        )


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # Error Comment is LO (64 chars); it carries UIDs at most, never PHI.
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def _peer(event: evt.Event) -> Peer:
    requestor = event.assoc.requestor
    return Peer(ae_title=(requestor.ae_title or "").strip() or None, host=requestor.address)


def handle_requested(event: evt.Event, policy: AccessPolicy, db: Database,
                     syntaxes: Mapping[str, Sequence[str]]) -> None:
    """EVT_REQUESTED: refuse unlisted callers and requests beyond the association limit
    before negotiation, and audit them; give an accepted one the contexts it asked for
    (``syntaxes``: ours, by abstract syntax)."""
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling = (primitive.calling_ae_title or "").strip() if primitive is not None else ""
    host = requestor.address
    reason = policy.refusal(calling, host)
    if reason is not None:
        # Rejected-permanent, service-user, calling AE title not recognised (PS3.8 9.3.4).
        _reject(event, db, (0x01, 0x01, 0x03), calling, host, reason)
        return
    ae = event.assoc.ae
    acceptors = sum(1 for a in ae.active_associations if a.is_acceptor)
    if acceptors > ae.maximum_associations:
        # Rejected-transient, service-provider (presentation), local limit exceeded.
        # pynetdicom would send the same, but close the socket before the PDU is out
        # (the peer sees a reset, not the reason) and audit nothing.
        _reject(event, db, (0x02, 0x03, 0x02), calling, host, "association limit reached")
        return
    if primitive is not None:
        acceptor = event.assoc.acceptor
        acceptor.supported_contexts = prefer_requestor_order(
            primitive.presentation_context_definition_list, syntaxes
        )


def _reject(event: evt.Event, db: Database, rsd: tuple[int, int, int], calling: str,
            host: str, reason: str) -> None:
    try:
        with db.session() as s:
            audit(s, "association.rejected", outcome="failure", actor=calling or None,
                  host=host, reason=reason)
    except SQLAlchemyError:
        log.exception("could not audit a refused association")
    log.warning("association refused", extra={"reason": reason, "calling_ae": calling})
    event.assoc.acse.send_reject(*rsd)
    # The reject PDU goes out on the DUL thread; pynetdicom closes the socket as
    # soon as this handler returns, so wait (bounded) until it has been sent or
    # the peer would see a bare disconnect instead of the reason. Sent means the
    # state machine left Sta3 (awaiting our response): Sta13, or already Sta1 when
    # the peer closed at once. Waiting for Sta13 alone kept every rejected
    # association alive for the whole bound, counted against the limit.
    dul = event.assoc.dul
    deadline = time.monotonic() + 2.0
    while dul.state_machine.current_state in ("Sta2", "Sta3") and time.monotonic() < deadline:
        time.sleep(0.002)


def handle_established(event: evt.Event, db: Database) -> None:
    """EVT_ESTABLISHED: audit the association and any SOP classes refused at negotiation."""
    peer = _peer(event)
    refused = sorted({str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts})
    try:
        with db.session() as s:
            audit(s, "association.accepted", actor=peer.ae_title, host=peer.host,
                  refused_sop_classes=refused)
    except SQLAlchemyError:
        log.exception("could not audit an association")


def handle_echo(event: evt.Event) -> int:
    return status.SUCCESS


def _part10(request: C_STORE, transfer_syntax_uid: str) -> bytes:
    """The received data set as a Part 10 file, its bytes as they arrived.

    What ``event.encoded_dataset()`` returns, with the File Meta Information
    encoded directly instead of through a pydicom FileMetaDataset (see
    storage.part10 for why that matters on this thread).
    """
    meta = encode_file_meta(
        str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
        transfer_syntax_uid, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    data = cast(BytesIO, request.DataSet)
    return meta + data.getbuffer()


def handle_store(event: evt.Event, ingestor: Ingestor) -> int | Dataset:
    """EVT_C_STORE: persist, then answer; never raises (a bug answers 0xC211)."""
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    try:
        ingestor.ingest(
            _part10(request, str(event.context.transfer_syntax)),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            peer=_peer(event),
            affected_sop_instance_uid=sop_uid or None,
        )
    except OutOfSpaceError as exc:
        return _status(status.OUT_OF_RESOURCES, f"out of resources: {exc}")
    except InputError as exc:
        return _status(status.BAD_IDENTIFIERS, f"cannot understand: {exc}")
    except ConflictError:
        return _status(status.DUPLICATE_CONFLICT, "different dataset under a stored SOP UID")
    except StorageError:
        log.exception("storage failure while receiving", extra={"sop_instance_uid": sop_uid})
        return _status(status.STORAGE_FAILURE, "storage failure")
    except Exception:
        log.exception("unexpected error in the C-STORE handler",
                      extra={"sop_instance_uid": sop_uid})
        return _status(status.INTERNAL_ERROR, "internal error")
    return status.SUCCESS


_RECV_CHUNK = 1 << 20
# Preallocated at most this much ahead of what has arrived: a PDU header may
# declare up to 4 GiB, and allocating what it declares would let six bytes
# from anyone take the process's memory.
_PREALLOC = 4 << 20


def _audit_rate_limited(db: Database, host: str, refused: int) -> None:
    try:
        with db.session() as s:
            audit(s, "association.rate_limited", outcome="failure", host=host,
                  refused=refused, reason="connection rate limit per host")
    except SQLAlchemyError:
        log.exception("could not audit rate-limited connections")
    log.warning("connections refused by the per-host rate limit", extra={"refused": refused})


class _BulkRecvSocket(AssociationSocket):
    """AssociationSocket whose recv() reads a whole PDU in as few system calls as it can,
    within a deadline.

    Why: pynetdicom reads every PDU in 4 KB ``recv`` calls and grows a
    bytearray each time (32 calls for one of storescu's 128 KB PDUs), all
    under the GIL of the process that also runs the C-STORE handlers. Reading
    into one buffer returns the same bytes with a few calls; the buffer grows
    with what arrives (``_PREALLOC`` ahead at most), never with what a header
    declares. The deadline: the network timeout is per ``recv`` call, so a
    peer sending one byte every few seconds would hold its association (and
    a slot of ``max_associations``) for ever; here the whole read must finish
    within ``pdu_deadline_s`` (the network timeout), or it times out like an
    idle connection. TLS behaves as in the base class (``SSLSocket.recv_into``
    is the TLS path).
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return bytearray()
        timeout = self.assoc.network_timeout
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        buf = bytearray(min(nr_bytes, _PREALLOC))
        got = 0
        try:
            while got < nr_bytes:
                if got == len(buf):
                    buf.extend(bytes(min(nr_bytes - got, max(len(buf), _PREALLOC))))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("PDU not received within the network timeout")
                    sock.settimeout(left)
                view = memoryview(buf)
                try:
                    n = sock.recv_into(view[got:], min(len(buf) - got, _RECV_CHUNK))
                finally:
                    del view
                if not n:  # connection closed: return what arrived, as the base class does
                    del buf[got:]
                    return buf
                got += n
        finally:
            if deadline is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(timeout)
        return buf


class _FastStoreDIMSE(DIMSEServiceProvider):
    """DIMSE provider that decodes C-STORE requests and encodes their success
    responses itself; everything else goes through pynetdicom unchanged.

    Why: for every message pynetdicom builds a pydicom Dataset of the command
    set and sets each element on the primitive through validating setters, and
    does the same in reverse for the response: together more CPU than the
    rest of the receive path, for two command sets of a few short elements,
    on the threads the waiting sender depends on. Here a C-STORE-RQ command
    is parsed by ``storage.part10.decode_store_request`` and the data set
    fragments go straight into the BytesIO pynetdicom would have filled; any
    other command (or one the parser is unsure of) is handed to pynetdicom as
    the same bytes. Bound EVT_DIMSE_RECV / EVT_DIMSE_SENT handlers, which need
    pynetdicom's message objects, turn the fast paths off. Tests compare the
    bytes and the primitives with pynetdicom's own.
    """

    _command: bytearray | None = None  # C-STORE-RQ command fragments so far
    _request: C_STORE | None = None  # the request whose data set is arriving
    _data: BytesIO | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            super().receive_primitive(primitive)
            return
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_pdv(context_id, data)

    def receive_pdvs(self, pdvs: list[tuple[int, memoryview]]) -> bool:
        """The DUL's direct path for a P-DATA-TF (node.network.reactor): its PDV
        items as views into the received PDU; False: nothing taken, use P_DATA."""
        if self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return False
        for context_id, data in pdvs:
            self._receive_pdv(context_id, data)
        return True

    def _pynetdicom(self, context_id: int, data: bytes | memoryview) -> None:
        single = P_DATA()
        single.presentation_data_value_list.append((context_id, bytes(data)))
        super().receive_primitive(single)

    def _receive_pdv(self, context_id: int, data: bytes | memoryview) -> None:
        control = data[0]
        if self.message is not None:  # pynetdicom is assembling a message
            self._pynetdicom(context_id, data)
            return
        request = self._request
        if request is None:
            if not control & 1:  # data before any command: pynetdicom's error handling
                self._pynetdicom(context_id, data)
                return
            if self._command is None:
                self._command = bytearray()
            self._command += memoryview(data)[1:]
            if control & 2:
                command, self._command = bytes(self._command), None
                request = self._store_request(command, context_id)
                if request is None:
                    self._pynetdicom(context_id, b"\x03" + command)
                    return
                self._request, self._data = request, BytesIO()
            return
        if control & 1 or self._data is None:  # a command in the middle of a data set
            LOGGER.error("DIMSE command fragment inside a C-STORE data set")
            self.dul.event_queue.put("Evt19")
            return
        self._data.write(memoryview(data)[1:])
        if control & 2:
            request.DataSet = self._data
            request._context_id = context_id
            self._request = self._data = None
            self.msg_queue.put((context_id, request))

    @staticmethod
    def _store_request(command: bytes, context_id: int) -> C_STORE | None:
        values = decode_store_request(command)
        if values is None:
            return None
        request = C_STORE()
        try:
            for keyword in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                            "Priority", "MoveOriginatorApplicationEntityTitle",
                            "MoveOriginatorMessageID"):
                if keyword in values:
                    setattr(request, keyword, values[keyword])
        except (TypeError, ValueError):
            return None  # pynetdicom decides what an invalid request gets
        request._context_id = context_id
        request._dataset_path = None
        request._dataset_file = None
        request._node_fast = True  # type: ignore[attr-defined]  # _StoreAssociation may serve it
        return request

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = store_response_command(
                str(primitive.AffectedSOPClassUID or ""),
                str(primitive.AffectedSOPInstanceUID or ""),
                int(primitive.MessageIDBeingRespondedTo), int(primitive.Status or 0),
            )
            if self._send_command(command, context_id):
                return
        super().send_msg(primitive, context_id)

    def send_store_response(self, request: C_STORE, status: int, context_id: int) -> bool:
        """Answer ``request`` with a bare ``status`` (no comment); False: nothing sent,
        the caller builds pynetdicom's response primitive instead."""
        if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            return False
        command = store_response_command(
            str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            int(request.MessageID or 0), status,
        )
        return self._send_command(command, context_id)

    def _send_command(self, command: bytes, context_id: int) -> bool:
        """Send an encoded command set as one PDV; False if it needs fragmenting."""
        max_pdu = self.maximum_pdu_size
        if max_pdu and len(command) + 6 > max_pdu:
            return False
        # Message control header 0x03: command information, last fragment.
        if not self._send_directly(context_id, b"\x03" + command):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
        return True

    def _send_directly(self, context_id: int, pdv: bytes) -> bool:
        """Send a one-PDV P-DATA-TF from this thread; False: queue it for the DUL.

        Why: queued, the response waits for the DUL thread to wake, run the
        state machine's DT-1 (all Evt9 can do in Sta6) and encode a PDU object,
        while the sender waits. Sent here it is one ``send`` of the same bytes.
        Only on plain TCP (an SSL object must not be used from two threads),
        in Sta6, with nothing queued ahead of it and no handlers bound to the
        PDU, data or transition events.
        """
        dul = self.dul
        sock = dul.socket
        if (
            sock is None
            or not isinstance(sock.socket, socket.socket)
            or isinstance(sock.socket, ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"
            or dul.to_provider_queue.queue
        ):
            return False
        if handlers_bound(self.assoc, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION):
            return False
        sock.send(encode_pdata_tf(context_id, pdv))
        return True


class _StoreAssociation(EventAssociation):
    """The event-driven association, serving C-STOREs that _FastStoreDIMSE decoded
    without pynetdicom's service class.

    Why: for each request ``StorageServiceClass.SCP`` builds a response
    primitive whose validating setters re-check the UIDs just copied from the
    request, checks the status against its tables and hands the primitive to
    the DIMSE provider, which (fast path) reads the same values back to encode
    them: together about a tenth of the receiver's Python time per instance.
    Here the EVT_C_STORE handlers run exactly as there (same Event, same
    exception status 0xC211) and a bare integer status is encoded directly; a
    status data set, a request under another SOP class than its context's or
    anything unusual goes through pynetdicom as before.
    """

    def _serve_request(self, msg: Any, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        dimse = self.dimse
        if (
            type(msg) is not C_STORE
            or not getattr(msg, "_node_fast", False)
            or context is None
            or self._sent_release
            or _config.UNRESTRICTED_STORAGE_SERVICE
            or msg.AffectedSOPClassUID != context.abstract_syntax
            or not isinstance(dimse, _FastStoreDIMSE)
        ):
            super()._serve_request(msg, context_id)
            return
        dimse.cancel_req = {}
        self._is_paused = True
        try:
            status: Any = evt.trigger(
                self, evt.EVT_C_STORE, {"request": msg, "context": context.as_tuple})
        except Exception:
            LOGGER.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            status = 0xC211
        finally:
            self._is_paused = False
            dimse.cancel_req = {}
        if not self.is_established:
            return
        if type(status) is int and dimse.send_store_response(msg, status, context_id):
            return
        service = StorageServiceClass(self)
        rsp = C_STORE()
        rsp.MessageID = msg.MessageID
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        dimse.send_msg(service.validate_status(status, rsp), context_id)


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, with the bulk-receive socket, the fast
    C-STORE response and the event-driven loops (node.network.reactor) on each
    association.

    The class swaps are the one place this module reaches past pynetdicom's
    public API (``AssociationServer`` takes a ``request_handler`` but the socket
    and DIMSE provider classes are fixed inside ``_create_association``); the
    subclasses add no state, so swapping the classes of the fresh objects is safe.
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = _BulkRecvSocket
        if type(assoc.dimse) is DIMSEServiceProvider:
            assoc.dimse.__class__ = _FastStoreDIMSE
        make_event_driven(assoc, _StoreAssociation)
        server = cast(_Server, self.server)
        if server.dispatcher is not None or server.on_end is not None:
            # The association runs on its own thread, started by handle(); its end
            # (release, abort or a dropped connection) is the end of that thread.
            run = assoc.run

            def run_then_report() -> None:
                try:
                    run()
                finally:
                    server.association_ended()

            assoc.run = run_then_report  # type: ignore[method-assign]
        return assoc


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server plus TCP_NODELAY, the TLS handshake on the
    connection's own thread and, in a node with several receiver processes, the
    hand-over of connections (node.network.dispatch).

    TCP_NODELAY: a C-STORE response is a small PDU; Nagle would hold it back.
    The handshake: pynetdicom performs it in ``get_request``, on the one
    acceptor thread, without a timeout, so a peer that opens a TCP connection
    to the TLS port and sends nothing (or one byte a second) would stop every
    other connection from being accepted. Here it runs where the association
    will, bounded by the ACSE timeout, and a refused one is audited.
    """

    # listen() backlog: socketserver's default of 5 drops the SYNs of a burst of
    # connections, which then wait seconds for the client's SYN retry.
    request_queue_size = 256
    dispatcher: Dispatcher | None = None  # main process: pass connections on
    on_end: Callable[[], None] | None = None  # receiver process: report ended associations
    db: Database | None = None  # where refused handshakes are audited
    rate_limiter: HostRateLimiter | None = None  # the listening process only
    handshake_timeout_s: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        limiter = self.rate_limiter
        if limiter is not None and not limiter.allow(str(client_address[0])):
            threading.Thread(target=refuse, args=(request,), name="dicom-refuse",
                             daemon=True).start()
            return
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher.hand_over(request, client_address):
            request.close()  # our copy; never shutdown(), the connection lives on
            return
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.ssl_context
        if context is not None:
            try:
                request = self._handshake(context, request)
            except (OSError, ssl.SSLError) as exc:
                self._refused(exc, client_address)
                self.association_ended()
                return
        super().finish_request(request, client_address)

    def _handshake(self, context: ssl.SSLContext, sock: socket.socket) -> ssl.SSLSocket:
        timeout = sock.gettimeout()
        sock.settimeout(self.handshake_timeout_s)
        tls = context.wrap_socket(sock, server_side=True)
        tls.settimeout(timeout)
        return tls

    def _refused(self, exc: BaseException, address: Any) -> None:
        reason = handshake_reason(exc)
        host = address[0] if isinstance(address, tuple) else None
        log.warning("TLS handshake refused", extra={"reason": reason})
        if self.db is None:
            return
        try:
            with self.db.session() as s:
                audit(s, "tls.refused", outcome="failure", host=host, reason=reason)
        except SQLAlchemyError:
            log.exception("could not audit a refused TLS handshake")

    def association_ended(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.local_done()
        if self.on_end is not None:
            self.on_end()


class Receiver:
    """One AE; start() returns once it accepts connections.

    Three roles: a node with one receiver process listens and serves; with
    several, the main process's receiver listens and passes each connection to
    the least busy process (``dispatcher``), and the receivers of the other
    processes (``adopt_only``) listen on nothing and serve what ``adopt`` hands
    them.
    """

    def __init__(
        self, settings: ReceiverSettings, ingestor: Ingestor, *,
        dispatcher: Dispatcher | None = None, adopt_only: bool = False,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.policy = AccessPolicy.from_config(settings.callers)
        self.dispatcher = dispatcher
        self.adopt_only = adopt_only
        self.on_end = on_end
        self._server: _Server | None = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.supported_contexts = supported_contexts()
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("receiver not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        s = self.settings
        db = self.ingestor.db
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, handle_requested,
             [self.policy, db, syntax_table(self._ae.supported_contexts)]),
            (evt.EVT_ESTABLISHED, handle_established, [db]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor]),
        ]
        if self.policy.open:
            log.warning("dicom.allowed_callers is empty: any calling AE may store to this node")
        # An adopt-only receiver binds a throw-away loopback port (pynetdicom's server
        # needs a socket) and closes it at once: it never accepts anything itself.
        address = ("127.0.0.1", 0) if self.adopt_only else (s.host, s.port)
        try:
            server = self._ae.make_server(
                address, ae_title=s.ae_title, ssl_context=server_context(s.tls),
                evt_handlers=handlers, server_class=_Server, request_handler=_RequestHandler,
            )
        except OSError as exc:
            raise ConfigError(f"dicom: cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
        self._ae._servers.append(server)  # so pynetdicom's own shutdown finds it
        # pynetdicom deep-copies the server's contexts into every new association;
        # handle_requested sets the ones a caller asked for, so there is nothing to copy.
        server.contexts = []
        self._server = cast(_Server, server)
        self._server.dispatcher = self.dispatcher
        self._server.on_end = self.on_end
        self._server.db = db
        self._server.handshake_timeout_s = s.acse_timeout_s
        if s.max_connections_per_host_per_minute and not self.adopt_only:
            self._server.rate_limiter = HostRateLimiter(
                s.max_connections_per_host_per_minute,
                audit=lambda host, n: _audit_rate_limited(db, host, n))
        if self.adopt_only:
            cast(socket.socket, self._server.socket).close()
            return
        thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor",
                                  daemon=True)
        thread.start()
        log.info("DICOM receiver listening",
                 extra={"ae_title": s.ae_title, "host": s.host, "port": self.port,
                        "tls": s.tls.enabled})

    def adopt(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Serve a connection another process accepted (the TLS handshake happens here)."""
        server = self._server
        if server is None:
            sock.close()
            raise RuntimeError("receiver not started")
        server.process_request(sock, address)  # the TLS handshake runs on its thread

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, give running associations ``grace_s`` to finish, abort the rest.

        An aborted store was never acknowledged, so the sender still owns it.
        """
        server, self._server = self._server, None
        if server is None:
            return
        if not self.adopt_only:  # shutdown() waits for a serve_forever loop
            server.shutdown()
            server.server_close()
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
