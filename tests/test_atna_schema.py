"""The DICOM audit messages the node exports validate against PS3.15 A.5.1.

The schema (node/schemas/dicom-audit-message.rng) is what an IHE ATNA audit
record repository checks; a message it refuses is an audit event lost. So the
trail here holds a row for every event name the node's code records (found by
reading the source, so a new event is covered the day it is added), the event
families the mapping table knows but nothing records yet (retention.*,
audit.*), an event nobody knows, and rows with awkward content; every message
``ainode audit export --format dicom`` writes for it must validate. The
negative cases show the schema refuses what it should, so the positive test
can fail.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import yaml

from node.audit_atna import _BY_PREFIX, SCHEMA, audit_message, validate
from storage import migrate
from storage.audit import audit
from storage.db import Database
from storage.models import utcnow
from tests.support.node import AINODE, REPO

pytest.importorskip("lxml")

_SOURCES = ("node", "storage", "pipelines")
_EVENT = re.compile(r'"([a-z]+\.[a-z_]+)"')
_NOT_EVENTS = re.compile(r"\.(html|yaml|json|pt|key_file)$")
# Families in node.audit_atna's table that no code records yet, and one no table knows.
_EXTRA = ("retention.deleted", "retention.failed", "audit.chain_broken", "audit.checkpoint",
          "send.sent", "something.nobody_knows")
_OUTCOMES = ("success", "warning", "failure")


def recorded_events() -> list[str]:
    """Event names the node's code passes to ``audit`` (or writes as an audit row's event).

    A line naming a dotted lower-case literal and mentioning audit or event;
    file names (``audit.html``) left out.
    """
    names: set[str] = set()
    for package in _SOURCES:
        for path in (REPO / package).rglob("*.py"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if "audit" not in line and "event" not in line:
                    continue
                names.update(n for n in _EVENT.findall(line) if not _NOT_EVENTS.search(n))
    return sorted(names)


def _trail(db: Database) -> list[str]:
    """Write the trail; return its event names in the order written."""
    events = [*recorded_events(), *_EXTRA]
    with db.session() as s:
        for i, event in enumerate(events):
            outcome = _OUTCOMES[i % 3]
            audit(s, event, outcome=outcome, actor="STORESCU", host="10.1.2.3",
                  study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.1.2",
                  sop_instance_uid=f"1.2.826.0.1.3680043.10.1.2.{i}", job_id=i,
                  reason=f"{event} {outcome}")
        # No participant but the node itself, nothing to point at.
        audit(s, "instance.write_failed", outcome="failure", reason="fsync: EIO")
        # A host name, an IPv6 peer, an outcome the table does not know.
        audit(s, "association.rejected", outcome="failure", actor="STRANGER",
              host="pacs.example.org", reason="unknown calling AE")
        audit(s, "association.rate_limited", outcome="refused", host="fe80::1%eth0")
        # What a hostile peer controls: control characters and markup in the AE title
        # and the error text (XML 1.0 cannot carry a NUL even escaped).
        audit(s, "instance.rejected", outcome="failure", actor="EVIL\x00AE<&>",
              host="10.9.9.9", reason="bad\x01dataset \x1f]]><x/>", error="tag (0010,0010)")
        # A study without series or instance.
        audit(s, "series.purged", study_uid="1.2.3")
    return [*events, "instance.write_failed", "association.rejected",
            "association.rate_limited", "instance.rejected", "series.purged"]


@pytest.fixture(scope="module")
def node_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("atna")
    data = tmp / "data"
    cfg = tmp / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)},
                                   "dicom": {"ae_title": "AINODE"}}))
    db = Database(f"sqlite:///{data / 'ainode.db'}")
    migrate.upgrade(db)
    events = _trail(db)
    db.dispose()
    return cfg, events


def _export(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AINODE, "--config", str(cfg), "audit", "export", "--since", "1d",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_scan_finds_the_events_the_node_records() -> None:
    names = recorded_events()
    # The families a SIEM files by, each recorded somewhere in the code today.
    for must in ("instance.received", "instance.duplicate", "instance.rejected",
                 "association.accepted", "association.rejected", "tls.refused",
                 "transfer.sent", "job.done", "series.completed", "user.login"):
        assert must in names
    assert not [n for n in names if n.endswith((".html", ".yaml"))]


def test_every_exported_dicom_message_validates(node_config: tuple[Path, list[str]]) -> None:
    cfg, events = node_config
    r = _export(cfg, "--format", "dicom")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(events)
    failures = {i: errs for i, line in enumerate(lines) if (errs := validate(line))}
    assert failures == {}, "\n".join(f"{events[i]}: {e}" for i, errs in failures.items()
                                     for e in errs)
    written = [ET.fromstring(line).find("EventIdentification/EventTypeCode") for line in lines]
    assert [e.get("csd-code") for e in written if e is not None] == events
    # Every family of the mapping table, and the unknown event, went through.
    prefixes = {p for p, _ in _BY_PREFIX}
    assert {p for p in prefixes if any(e == p or e.startswith(p) for e in events)} == prefixes
    assert "something.nobody_knows" in events


def test_export_validate_checks_each_message(node_config: tuple[Path, list[str]]) -> None:
    cfg, events = node_config
    r = _export(cfg, "--format", "dicom", "--validate")
    assert r.returncode == 0, r.stderr
    assert f"{len(events)} of {len(events)} messages valid" in r.stderr
    r = _export(cfg, "--format", "jsonl", "--validate")
    assert r.returncode == 2
    assert "--format dicom" in r.stderr


def test_messages_carry_what_the_schema_types_strictly(
    node_config: tuple[Path, list[str]],
) -> None:
    cfg, _ = node_config
    r = _export(cfg, "--format", "dicom", "--event", "association.*")
    msgs = [ET.fromstring(line) for line in r.stdout.splitlines()]
    points = {p.get("NetworkAccessPointID"): p.get("NetworkAccessPointTypeCode")
              for m in msgs for p in m.iter("ActiveParticipant")
              if p.get("NetworkAccessPointID")}
    assert points["10.1.2.3"] == "2" and points["fe80::1%eth0"] == "2"
    assert points["pacs.example.org"] == "1"  # a machine name is not an IP address
    r = _export(cfg, "--format", "dicom", "--event", "instance.rejected")
    evil = [ET.fromstring(line) for line in r.stdout.splitlines()][-1]
    users = [p.get("UserID") for p in evil.iter("ActiveParticipant")]
    assert "EVIL\ufffdAE<&>" in users
    assert evil.findtext("EventIdentification/EventOutcomeDescription") == \
        "bad\ufffddataset \ufffd]]><x/>"
    r = _export(cfg, "--format", "dicom", "--event", "instance.received")
    msg = ET.fromstring(r.stdout.splitlines()[0])
    when = msg.find("EventIdentification")
    assert when is not None and when.get("EventDateTime", "").endswith("+00:00")
    details = {d.get("type"): base64.b64decode(d.get("value", "")).decode()
               for d in msg.iter("ParticipantObjectDetail")}
    assert details == {"SeriesInstanceUID": "1.2.826.0.1.3680043.10.1.2",
                       "SOPInstanceUID": details["SOPInstanceUID"]}
    assert details["SOPInstanceUID"].startswith("1.2.826.0.1.3680043.10.1.2.")


def _valid() -> ET.Element:
    row = {"id": 1, "ts": utcnow(), "event": "instance.received", "outcome": "success",
           "actor": "STORESCU", "host": "127.0.0.1", "study_uid": "1.2.3",
           "series_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.4.5", "job_id": None,
           "details": {}}
    return audit_message(row, source_id="AINODE")


def _set(path: str, attr: str, value: str) -> Callable[[ET.Element], None]:
    def edit(msg: ET.Element) -> None:
        node = msg.find(path)
        assert node is not None
        node.set(attr, value)
    return edit


def _unset(path: str, attr: str) -> Callable[[ET.Element], None]:
    def edit(msg: ET.Element) -> None:
        node = msg.find(path)
        assert node is not None
        del node.attrib[attr]
    return edit


def _drop(tag: str) -> Callable[[ET.Element], None]:
    def edit(msg: ET.Element) -> None:
        node = msg.find(tag)
        assert node is not None
        msg.remove(node)
    return edit


def _swap_source_and_object(msg: ET.Element) -> None:
    src, obj = msg.find("AuditSourceIdentification"), msg.find("ParticipantObjectIdentification")
    assert src is not None and obj is not None
    msg.remove(src)
    msg.append(src)  # after the participant object: out of order


_BROKEN: dict[str, tuple[Callable[[ET.Element], Any], str]] = {
    "bad EventActionCode": (_set("EventIdentification", "EventActionCode", "X"),
                            "EventActionCode"),
    "bad EventOutcomeIndicator": (_set("EventIdentification", "EventOutcomeIndicator", "1"),
                                  "EventIdentification"),
    "EventDateTime not a dateTime": (_set("EventIdentification", "EventDateTime",
                                          "2024-05-01 08:00:00"), "dateTime"),
    # libxml2 names the element it met where the missing one belonged.
    "no AuditSourceIdentification": (_drop("AuditSourceIdentification"),
                                     "ParticipantObjectIdentification"),
    "no AuditSourceIdentification nor object": (
        lambda m: [_drop(t)(m) for t in ("AuditSourceIdentification",
                                         "ParticipantObjectIdentification")],
        "Expecting an element"),
    "no EventIdentification": (_drop("EventIdentification"), "ActiveParticipant"),
    "no ActiveParticipant": (lambda m: [m.remove(p) for p in m.findall("ActiveParticipant")],
                             "AuditSourceIdentification"),
    "elements out of order": (_swap_source_and_object, "ParticipantObjectIdentification"),
    "UserIsRequestor not a boolean": (_set("ActiveParticipant", "UserIsRequestor", "yes"),
                                      "boolean"),
    "NetworkAccessPointTypeCode 6": (_set("ActiveParticipant", "NetworkAccessPointTypeCode",
                                          "6"), "NetworkAccessPointTypeCode"),
    "ParticipantObjectTypeCode 5": (_set("ParticipantObjectIdentification",
                                         "ParticipantObjectTypeCode", "5"),
                                    "ParticipantObjectTypeCode"),
    # What the node wrote before: a UID, not base64, as a detail value. (libxml2 skips
    # the dots, so a UID whose digits come in fours would slip through it; this one does not.)
    "detail value not base64": (_set("ParticipantObjectIdentification/ParticipantObjectDetail",
                                     "value", "1.2.3.4.5"), "ParticipantObjectDetail"),
    "EventID without originalText": (_unset("EventIdentification/EventID", "originalText"),
                                     "EventID"),
}


def test_the_unedited_message_validates() -> None:
    assert validate(_valid()) == []
    assert validate(ET.tostring(_valid(), encoding="unicode")) == []


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_the_schema_refuses_a_broken_message(case: str) -> None:
    edit, where = _BROKEN[case]
    msg = _valid()
    edit(msg)
    errors = validate(msg)
    assert errors, f"{case}: the schema accepted it"
    assert any(where in e for e in errors), errors


def test_malformed_xml_is_reported_not_raised() -> None:
    errors = validate(b"<AuditMessage><EventIdentification></AuditMessage>")
    assert len(errors) == 1 and errors[0].startswith("not well-formed XML")


def test_the_schema_ships_inside_the_package() -> None:
    assert resources.files("node").joinpath(SCHEMA).is_file()
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"schemas/*.rng"' in pyproject
