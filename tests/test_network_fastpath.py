"""The receiver's own C-STORE decoding and response encoding (node.network.scp._FastStoreDIMSE)
give pynetdicom's primitives and bytes; everything else still goes through pynetdicom."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node.network.scp import _FastStoreDIMSE
from storage.part10 import decode_store_request

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
          "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


def _provider(fast: bool) -> DIMSEServiceProvider:
    assoc = Association(AE(), "acceptor")
    if fast:
        assoc.dimse.__class__ = _FastStoreDIMSE
    return assoc.dimse


def _store_request(move_originator: bool = False) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = 11
    rq.AffectedSOPClassUID = CT_IMAGE
    rq.AffectedSOPInstanceUID = "1.2.3.4.5"
    rq.Priority = 0x0002
    if move_originator:
        rq.MoveOriginatorApplicationEntityTitle = "MOVER"
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(bytes(range(256)) * 1000)  # 256 KB, split over several PDUs
    return rq


def _pdata(primitive: Any, max_pdu: int) -> list[P_DATA]:
    msg = (C_STORE_RQ if isinstance(primitive, C_STORE) else C_ECHO_RQ)()
    msg.primitive_to_message(primitive)
    return list(msg.encode_msg(1, max_pdu))


def _receive(dimse: DIMSEServiceProvider, pdatas: list[P_DATA]) -> tuple[int, Any]:
    for p in pdatas:
        dimse.receive_primitive(p)
    context_id, primitive = dimse.msg_queue.get_nowait()
    assert dimse.msg_queue.empty()
    return context_id, primitive


@pytest.mark.parametrize("move_originator", [False, True])
@pytest.mark.parametrize("max_pdu", [16384, 0])
def test_store_request_decodes_as_pynetdicom_does(move_originator: bool, max_pdu: int) -> None:
    pdatas = _pdata(_store_request(move_originator), max_pdu)
    cx_fast, fast = _receive(_provider(True), pdatas)
    cx_slow, slow = _receive(_provider(False), pdatas)
    assert cx_fast == cx_slow == 1
    for field in FIELDS:
        assert getattr(fast, field) == getattr(slow, field), field
    assert fast.DataSet.getvalue() == slow.DataSet.getvalue()
    assert fast._context_id == slow._context_id == 1
    assert fast.is_valid_request


def test_two_requests_in_a_row_and_an_echo_between() -> None:
    dimse = _provider(True)
    echo = C_ECHO()
    echo.MessageID = 5
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    for primitive in (_store_request(), echo, _store_request(True)):
        _, got = _receive(dimse, _pdata(primitive, 16384))
        assert type(got) is type(primitive)
        assert got.MessageID == primitive.MessageID


def test_unknown_command_elements_go_to_pynetdicom() -> None:
    rq = _store_request()
    first = _pdata(rq, 16384)[0]
    ((_, command),) = first.presentation_data_value_list[:1]
    assert decode_store_request(command[1:]) is not None
    # An element PS3.7 does not list for C-STORE-RQ: the parser must decline it.
    extra = b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"
    assert decode_store_request(command[1:] + extra) is None
    assert decode_store_request(command[1:-3]) is None  # truncated
    assert decode_store_request(b"") is None


def test_bound_dimse_handlers_get_pynetdicom_messages() -> None:
    dimse = _provider(True)
    seen: list[object] = []
    dimse.assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(event.message))
    _, got = _receive(dimse, _pdata(_store_request(), 16384))
    assert isinstance(got, C_STORE) and len(seen) == 1


@pytest.mark.parametrize("max_pdu", [16384, 0])
def test_pdv_split_matches_pynetdicoms_p_data_tf_decoder(max_pdu: int) -> None:
    """node.network.reactor.split_pdvs gives the PDV items pynetdicom's own decoder
    gives, for the P-DATA-TF PDUs pynetdicom itself encodes."""
    from pynetdicom.pdu import P_DATA_TF

    from node.network.reactor import split_pdvs

    for pdata in _pdata(_store_request(True), max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        encoded = pdu.encode()
        decoded = P_DATA_TF()
        decoded.decode(encoded)
        ours = split_pdvs(bytearray(encoded[6:]))
        assert ours is not None
        theirs = decoded.to_primitive().presentation_data_value_list
        assert [(cx, bytes(v)) for cx, v in ours] == [(cx, bytes(v)) for cx, v in theirs]


@pytest.mark.parametrize("body", [
    b"",  # no item
    b"\x00\x00\x00\x10\x01\x03abc",  # item longer than the PDU
    b"\x00\x00\x00\x01\x01",  # item with a context ID and no message control header
    b"\x00\x00\x00\x03\x01\x03a\x00",  # trailing byte after the last item
])
def test_malformed_pdv_items_are_left_to_pynetdicom(body: bytes) -> None:
    from node.network.reactor import split_pdvs

    assert split_pdvs(body) is None


def test_direct_pdvs_give_the_same_request_as_p_data() -> None:
    """The DUL's direct path (receive_pdvs with views into the PDU) and pynetdicom's
    P_DATA primitives give the same C-STORE request."""
    from node.network.reactor import split_pdvs

    pdatas = _pdata(_store_request(), 16384)
    direct = _provider(True)
    for p in pdatas:
        body = bytearray()
        for cx, data in p.presentation_data_value_list:
            body += (len(data) + 1).to_bytes(4, "big") + bytes([cx]) + data
        pdvs = split_pdvs(body)
        assert pdvs is not None
        assert direct.receive_pdvs(pdvs)  # type: ignore[attr-defined]
    _, got = direct.msg_queue.get_nowait()
    _, want = _receive(_provider(False), pdatas)
    for field in FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    assert got.DataSet.getvalue() == want.DataSet.getvalue()


def test_directly_sent_response_pdu_is_pynetdicoms_encoding() -> None:
    """The C-STORE response the association thread sends itself (scp._send_directly)
    has the bytes of pynetdicom's P-DATA-TF for the same PDV."""
    from pynetdicom.pdu import P_DATA_TF

    from node.network.reactor import encode_pdata_tf

    pdv = b"\x03" + bytes(range(90))
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((7, pdv))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert encode_pdata_tf(7, pdv) == pdu.encode()


def test_a_late_wake_up_never_writes_to_a_reused_descriptor() -> None:
    """Once the DUL reactor has ended and closed its wake-up pipe, a wake-up from another
    thread (the association's kill() does one) must not write to that descriptor
    number, which the process may already have reused for a spool file."""
    import os
    import threading

    from node.network.reactor import make_event_driven

    assoc = Association(AE(), "acceptor")
    assert make_event_driven(assoc)
    dul: Any = assoc.dul
    old_w = dul._wake_w
    dul._kill_thread = True
    dul.run_reactor()  # the loop sees the kill flag at once and closes its pipe
    r, w = os.pipe()
    try:
        assert old_w in (r, w)  # the number was reused, so a stray write would show
        waker = threading.Thread(target=dul.wake)
        waker.start()
        waker.join()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # nothing was written into the pipe that took the number
    finally:
        os.close(r)
        os.close(w)
