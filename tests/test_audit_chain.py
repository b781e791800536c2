"""The tamper-evident audit trail: hash chain, checkpoints, verify, DICOM audit messages,
forwarding to a syslog collector over TLS (a listener this test runs, certificates it makes).

On SQLite and PostgreSQL (``any_db``); the tampering is done with plain SQL, as
someone with database access would.
"""

from __future__ import annotations

import base64
import itertools
import socket
import ssl
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import sqlalchemy as sa
import yaml

from node.audit_atna import audit_message
from node.audit_trail import AuditTrail, row_dict
from node.config import AuditConfig, SyslogConfig
from storage.audit import audit
from storage.audit_chain import row_hash, seal, verify
from storage.db import Database
from storage.models import AuditCheckpoint, AuditEvent, utcnow
from tests.support.node import AINODE, REPO
from tests.support.pki import make_pki


def _write(db: Database, n: int, start: int = 0) -> None:
    with db.session() as s:
        for i in range(start, start + n):
            audit(s, "instance.received", actor="STORESCU", host="127.0.0.1",
                  study_uid="1.2.3", series_uid="1.2.3.4", sop_instance_uid=f"1.2.3.4.{i}",
                  size=1000 + i)


def _seal(db: Database, key: bytes | None = None, every: int = 5) -> None:
    with db.session() as s:
        seal(s, key=key, checkpoint_every=every, checkpoint=True)


def _verify(db: Database, key: bytes | None = None) -> list[tuple[str, int | None]]:
    with db.session() as s:
        report = verify(s, key=key)
    return [(p.kind, p.audit_id) for p in report.problems]


def _ids(db: Database) -> list[int]:
    with db.session() as s:
        return list(s.scalars(sa.select(AuditEvent.id).order_by(AuditEvent.id)))


def test_an_intact_chain_verifies_and_new_rows_extend_it(any_db: Database) -> None:
    _write(any_db, 7)
    _seal(any_db)
    _write(any_db, 3, start=7)
    with any_db.session() as s:
        assert verify(s).pending == 3  # written after the last seal: waiting, not a problem
    _seal(any_db)
    with any_db.session() as s:
        report = verify(s)
        rows = list(s.scalars(sa.select(AuditEvent).order_by(AuditEvent.chain_seq)))
    assert report.ok and report.sealed == 10 and report.pending == 0
    assert report.checkpoints == 3  # at 5 and 10 (every 5 rows), and at 7 (asked for)
    assert [r.chain_seq for r in rows] == list(range(1, 11))
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(rows))


def test_verify_names_the_edited_the_deleted_and_the_inserted_row(any_db: Database) -> None:
    _write(any_db, 12)
    _seal(any_db, every=100)
    ids = _ids(any_db)
    with any_db.engine.begin() as c:
        c.execute(sa.text("UPDATE audit_events SET actor = 'SOMEONE' WHERE id = :i"),
                  {"i": ids[3]})
        c.execute(sa.text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[7]})
    # An inserted row: an id in the gap the deletion left, dated among the old rows.
    old = utcnow() - timedelta(hours=1)
    with any_db.session() as s:
        s.add(AuditEvent(id=ids[7], ts=old, event="instance.received", outcome="success",
                         actor="FORGED", details={}))
    problems = _verify(any_db)
    # Each named once: the row after the gap names the deletion.
    assert sorted(problems, key=str) == sorted(
        [("edited", ids[3]), ("deleted", ids[8]), ("inserted", ids[7])], key=str)


def test_a_rebuilt_chain_is_caught_by_the_keyed_checkpoint(any_db: Database) -> None:
    key = b"kept-outside-the-database"
    _write(any_db, 6)
    _seal(any_db, key=key, every=3)
    # Someone with database access edits row 2 and recomputes every hash after it.
    with any_db.session() as s:
        rows = list(s.scalars(sa.select(AuditEvent).order_by(AuditEvent.chain_seq)))
        rows[1].actor = "SOMEONE"
        prev = rows[0].row_hash or ""
        for r in rows[1:]:
            r.prev_hash = prev
            prev = r.row_hash = row_hash(prev, r)
        for cp in s.scalars(sa.select(AuditCheckpoint)):
            cp.row_hash = next(r.row_hash for r in rows if r.chain_seq == cp.chain_seq) or ""
    # Without the key the rebuilt chain looks whole; with it the checkpoints fail.
    assert _verify(any_db) == []
    assert [k for k, _ in _verify(any_db, key=key)] == ["checkpoint", "checkpoint"]


def test_dicom_audit_message_carries_the_coded_event_and_participants() -> None:
    row = {"id": 1, "ts": utcnow(), "event": "association.rejected", "outcome": "failure",
           "actor": "STRANGER", "host": "10.0.0.9", "study_uid": None, "series_uid": None,
           "sop_instance_uid": None, "job_id": None, "details": {"reason": "unknown AE"}}
    msg = ET.fromstring(ET.tostring(audit_message(row, source_id="AINODE")))
    ident = msg.find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "8"
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110114"
    assert event_id.get("codeSystemName") == "DCM"
    assert ident.findtext("EventOutcomeDescription") == "unknown AE"
    users = {p.get("UserID"): p for p in msg.findall("ActiveParticipant")}
    assert users["STRANGER"].get("NetworkAccessPointID") == "10.0.0.9"
    assert users["STRANGER"].get("UserIsRequestor") == "true"
    src = msg.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID") == "AINODE"
    stored = dict(row, event="instance.received", outcome="success", study_uid="1.2.3",
                  series_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5")
    msg = audit_message(stored, source_id="AINODE")
    obj = msg.find("ParticipantObjectIdentification")
    assert obj is not None and obj.get("ParticipantObjectID") == "1.2.3"
    code = obj.find("ParticipantObjectIDTypeCode")
    assert code is not None and code.get("csd-code") == "110180"
    ev = msg.find("EventIdentification/EventID")
    assert ev is not None and ev.get("csd-code") == "110104"


class _Collector:
    """A TLS syslog listener (RFC 5425 octet counting) on a free loopback port."""

    def __init__(self, pki: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki / "syslog.crt"), str(pki / "syslog.key"))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.frames: list[bytes] = []
        self.versions: list[str | None] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                self.versions.append(conn.version())
                buf = b""
                while chunk := conn.recv(65536):
                    buf += chunk
                    while b" " in buf:
                        length, rest = buf.split(b" ", 1)
                        if len(rest) < int(length):
                            break
                        self.frames.append(rest[: int(length)])
                        buf = rest[int(length):]

    def close(self) -> None:
        self.sock.close()


def test_sealed_rows_are_forwarded_to_a_syslog_collector_over_tls(
    any_db: Database, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    collector = _Collector(pki)
    cfg = AuditConfig(checkpoint_every=100, syslog=SyslogConfig(
        enabled=True, host="127.0.0.1", port=collector.port, ca_file=pki / "ca.crt"))
    trail = AuditTrail(cfg, any_db, source_id="AINODE")
    try:
        _write(any_db, 4)
        trail.tick()
        _write(any_db, 2, start=4)
        trail.tick()
        trail.tick()  # nothing new: nothing sent twice
        trail.close()
        import time

        deadline = time.monotonic() + 10
        while len(collector.frames) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        collector.close()
    assert len(collector.frames) == 6
    assert collector.versions and collector.versions[0] in ("TLSv1.2", "TLSv1.3")
    first = collector.frames[0]
    assert first.startswith(b"<85>1 ")  # facility 10 (security), severity notice
    xml = ET.fromstring(first[first.index(b"\xef\xbb\xbf") + 3:])
    assert xml.tag == "AuditMessage"
    sops = [ET.fromstring(f[f.index(b"\xef\xbb\xbf") + 3:])
            .find("ParticipantObjectIdentification/ParticipantObjectDetail[@type="
                  "'SOPInstanceUID']") for f in collector.frames]
    # Detail values are xsd:base64Binary (PS3.15 A.5.1).
    assert [base64.b64decode(e.get("value", "")).decode() for e in sops if e is not None] == \
        [f"1.2.3.4.{i}" for i in range(6)]
    with any_db.session() as s:
        assert verify(s).ok
        assert [row_dict(r)["event"] for r in s.scalars(sa.select(AuditEvent))] == \
            ["instance.received"] * 6


def test_audit_verify_cli_exits_1_naming_the_edited_row(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    db = Database(f"sqlite:///{data / 'ainode.db'}")
    from storage import migrate

    migrate.upgrade(db)
    _write(db, 5)
    _seal(db)
    ids = _ids(db)
    with db.engine.begin() as c:
        c.execute(sa.text("UPDATE audit_events SET host = '10.9.9.9' WHERE id = :i"),
                  {"i": ids[2]})
    db.dispose()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AINODE, "--config", str(cfg), "audit", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    r = run("verify")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"edited: audit id {ids[2]} (chain_seq 3) was edited" in r.stdout
    r = run("export", "--since", "1d", "--format", "dicom")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5 and all(ET.fromstring(x).tag == "AuditMessage" for x in lines)


@pytest.mark.parametrize("n", [0])
def test_sealing_an_empty_trail_is_a_no_op(any_db: Database, n: int) -> None:
    _write(any_db, n)
    _seal(any_db)
    with any_db.session() as s:
        assert verify(s).ok and s.scalar(sa.select(sa.func.count()).select_from(
            AuditCheckpoint)) == 0
