"""Floods and slow peers against the running node (`ainode serve`, two receiver processes).

Raw sockets send what dcmtk never would (200 association requests at once, one
byte a second, a burst from one host); dcmtk's echoscu/storescu are the
well-behaved senders that must still get through.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.models import AuditEvent, Instance
from tests.support.data import dicom_series_dir
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProc, echo_ok, start_node
from tests.support.pdu import RELEASE_RQ, associate_rq, read_pdu
from tests.support.peers import dcmtk_env, require

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def _node(tmp: Path, workers: int = 2, **dicom: object) -> NodeProc:
    port = free_port()
    return start_node(tmp, workers=workers, port=port, serve_args=("--no-jobs",), extra={"dicom": {
        "ae_title": "AINODE", "host": "127.0.0.1", "port": port,
        "allowed_callers": ["ECHOSCU", "STORESCU", "FLOOD", "SLOW"], **dicom}})


def _storescu_ok(port: int, series: Path) -> bool:
    import subprocess

    r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE", "+sd",
                        "127.0.0.1", str(port), str(series)], env=dcmtk_env(),
                       capture_output=True, text=True, timeout=300)
    return r.returncode == 0


def _audit(node: NodeProc, event: str) -> list[AuditEvent]:
    with node.db.session() as s:
        return list(s.scalars(sa.select(AuditEvent).where(AuditEvent.event == event)))


def test_200_association_requests_at_once(tmp_path: Path) -> None:
    """dicom.max_associations = 8: of 200 simultaneous requests, those beyond the limit get
    A-ASSOCIATE-RJ (transient, service provider, local limit exceeded); the accepted ones
    are held until all have answers, then released cleanly; storescu gets through after."""
    node = _node(tmp_path, max_associations=8, acse_timeout_s=10.0)
    try:
        rq = associate_rq("FLOOD")
        answers: list[bytes] = []
        released: list[bool] = []
        lock = threading.Lock()
        all_answered = threading.Event()

        def one() -> None:
            try:
                s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
            except OSError:
                with lock:
                    answers.append(b"connect-failed")
                return
            with s:
                try:
                    s.sendall(rq)
                    pdu = read_pdu(s)
                except OSError:
                    pdu = b"reset"
                with lock:
                    answers.append(pdu[:10])
                    if len(answers) == 200:
                        all_answered.set()
                if pdu[:1] == b"\x02":  # accepted: hold the slot until everyone has an answer
                    all_answered.wait(60)
                    s.sendall(RELEASE_RQ)
                    rp = read_pdu(s)
                    with lock:
                        released.append(rp[:1] == b"\x06")

        threads = [threading.Thread(target=one) for _ in range(200)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        took = time.monotonic() - start
        accepted = [a for a in answers if a[:1] == b"\x02"]
        rejected = [a for a in answers if a[:1] == b"\x03"]
        other = [a for a in answers if a[:1] not in (b"\x02", b"\x03")]
        print(f"200 requests: {len(accepted)} accepted, {len(rejected)} rejected, "
              f"{len(other)} other, in {took:.1f} s")
        assert len(answers) == 200 and not other, other[:5]
        assert 1 <= len(accepted) <= 8
        assert len(rejected) == 200 - len(accepted)
        # result 2 (rejected-transient), source 3 (service provider, presentation),
        # reason 2 (local limit exceeded): PS3.8 9.3.4.
        assert {struct.unpack("BBB", r[7:10]) for r in rejected} == {(2, 3, 2)}
        assert released == [True] * len(accepted)
        wait_for(lambda: echo_ok(node.port), timeout=10, what="a free slot after the flood")
        assert _storescu_ok(node.port, dicom_series_dir("ct_phantom_philips"))
        refused = [r for r in _audit(node, "association.rejected") if r.actor == "FLOOD"]
        assert len(refused) == len(rejected)
        assert {r.details["reason"] for r in refused} == {"association limit reached"}
        with node.db.session() as s:
            assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 28
    finally:
        node.stop()


def test_a_peer_sending_one_byte_a_second_is_dropped(tmp_path: Path) -> None:
    """A trickled A-ASSOCIATE-RQ, and an established association that trickles a P-DATA-TF,
    are each dropped within the timeouts (2 s here), and free their slot.

    One receiver process: with two, each takes half of ``max_associations`` and the kernel
    may hand both trickling peers to the same one, which then rightly refuses the second."""
    node = _node(tmp_path, workers=1, max_associations=2, acse_timeout_s=2.0,
                 network_timeout_s=2.0)
    try:
        results: dict[str, float] = {}

        errors: dict[str, str] = {}

        def trickle(name: str, prefix: bytes, body: bytes) -> None:
            try:
                _trickle(name, prefix, body)
            except Exception as exc:  # the thread's failure, reported by the assert below
                errors[name] = repr(exc)

        def _connect(prefix: bytes) -> socket.socket:
            """A connection, associated when ``prefix`` is an A-ASSOCIATE-RQ. A transient
            reject (the slot of the start-up probe's association not yet given back) is
            retried for a few seconds, as an SCU would."""
            deadline = time.monotonic() + 5
            while True:
                s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
                if not prefix:
                    return s
                s.sendall(prefix)
                answer = read_pdu(s)
                if answer[:1] == b"\x02":
                    return s
                s.close()
                assert answer[:1] == b"\x03" and time.monotonic() < deadline, (
                    f"not accepted: {answer.hex()}")
                time.sleep(0.5)

        def _trickle(name: str, prefix: bytes, body: bytes) -> None:
            with _connect(prefix) as s:
                start = time.monotonic()
                try:
                    for b in body:
                        s.sendall(bytes([b]))
                        time.sleep(1.0)
                        if time.monotonic() - start > 20:
                            break
                except OSError:
                    pass  # reset by the node: dropped
                results[name] = time.monotonic() - start

        rq = associate_rq("SLOW")
        # A P-DATA-TF header declaring 1 MB, then its bytes one a second.
        pdata = struct.pack(">BBL", 4, 0, 1 << 20) + b"\0" * 64
        threads = [threading.Thread(target=trickle, args=("associate", b"", rq)),
                   threading.Thread(target=trickle, args=("pdata", rq, pdata))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        print(f"trickling peers dropped after {results}")
        assert not errors, errors
        assert results["associate"] < 8 and results["pdata"] < 8, results
        wait_for(lambda: echo_ok(node.port), timeout=10, what="the freed slots")
    finally:
        node.stop()


def test_connections_beyond_a_hosts_rate_are_refused_and_audited_once(tmp_path: Path) -> None:
    """max_connections_per_host_per_minute = 10: a burst of 30 from one host gets 10
    associations and 20 A-ASSOCIATE-RJ (transient, local limit exceeded), audited as one
    row with the count; a token later (6 s at 10 a minute) echoscu gets through."""
    node = _node(tmp_path, max_connections_per_host_per_minute=10)
    try:
        time.sleep(6.5)  # the readiness probes spent tokens; let the bucket refill
        rq = associate_rq("FLOOD")
        answers = []
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
                s.sendall(rq)
                pdu = read_pdu(s)
                answers.append(pdu[:10])
                if pdu[:1] == b"\x02":
                    s.sendall(RELEASE_RQ)
                    read_pdu(s)
        accepted = sum(a[:1] == b"\x02" for a in answers)
        rejected = [a for a in answers if a[:1] == b"\x03"]
        print(f"burst of 30: {accepted} accepted, {len(rejected)} refused")
        assert 9 <= accepted <= 11 and accepted + len(rejected) == 30
        assert {struct.unpack("BBB", r[7:10]) for r in rejected} == {(2, 3, 2)}
        rows = wait_for(lambda: _audit(node, "association.rate_limited"), timeout=10,
                        what="the rate-limit audit row")
        assert len(rows) == 1 and rows[0].host == "127.0.0.1"
        assert rows[0].details["refused"] == 1  # the first; the rest are counted in the next
        time.sleep(6.5)
        assert echo_ok(node.port)
    finally:
        node.stop()
