"""Audit rows as DICOM audit messages (PS3.15 A.5, the schema IHE ATNA validates against).

Why a mapping table rather than free text: a SIEM or an ATNA audit record
repository files messages by their coded EventID (DCM 1101xx) and outcome
indicator, so each of the node's event names is given the PS3.15 A.5.3
message it is an instance of; an event the table does not know is an
Application Activity message with the node's own event name as its type.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any
from xml.etree import ElementTree as ET

__all__ = ["SCHEMA", "EventCode", "audit_message", "audit_messages", "event_code", "schema",
           "validate"]

# PS3.15 A.5.1 as RELAX NG (XML syntax), shipped as package data.
SCHEMA = "schemas/dicom-audit-message.rng"
# Characters XML 1.0 cannot carry at all (not even escaped): C0 controls but tab,
# newline and carriage return, lone surrogates, U+FFFE/U+FFFF. A peer's AE title or
# an error text holding one would otherwise make the whole message unreadable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class EventCode:
    code: str
    meaning: str
    action: str  # EventActionCode: C R U D E


_DCM = "DCM"
_BY_PREFIX: tuple[tuple[str, EventCode], ...] = (
    ("instance.received", EventCode("110104", "DICOM Instances Transferred", "C")),
    ("instance.duplicate", EventCode("110104", "DICOM Instances Transferred", "R")),
    ("instance.rejected", EventCode("110104", "DICOM Instances Transferred", "C")),
    ("instance.conflict", EventCode("110104", "DICOM Instances Transferred", "C")),
    ("instance.", EventCode("110103", "DICOM Instances Accessed", "D")),
    ("series.", EventCode("110103", "DICOM Instances Accessed", "U")),
    ("association.", EventCode("110114", "User Authentication", "E")),
    ("tls.", EventCode("110113", "Security Alert", "E")),
    ("audit.", EventCode("110113", "Security Alert", "E")),
    ("send.", EventCode("110106", "Export", "R")),
    ("transfer.", EventCode("110106", "Export", "R")),
    ("job.", EventCode("110103", "DICOM Instances Accessed", "R")),
    ("retention.", EventCode("110105", "DICOM Study Deleted", "D")),
)
_APPLICATION = EventCode("110100", "Application Activity", "E")
# EventOutcomeIndicator (PS3.15 A.5.1): 0 success, 4 minor failure, 8 serious failure.
_OUTCOME = {"success": "0", "warning": "4", "failure": "8"}


def event_code(event: str) -> EventCode:
    for prefix, code in _BY_PREFIX:
        if event == prefix or (prefix.endswith(".") and event.startswith(prefix)):
            return code
    return _APPLICATION


def _x(value: Any) -> str:
    """``value`` as text XML 1.0 can hold: characters it cannot are replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", str(value))


def _code(parent: ET.Element, tag: str, code: str, meaning: str,
          system: str = _DCM) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": _x(code), "codeSystemName": system,
                                       "originalText": _x(meaning)})


def _ts(value: Any) -> str:
    """An xsd:dateTime in UTC (A.5.2.5), from an aware or naive (UTC) datetime or its text.

    Text is read back as a datetime first: ``str(datetime)`` has a space where
    xsd:dateTime needs the ``T``.
    """
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.isoformat()


def _b64(value: Any) -> str:
    """A ParticipantObjectDetail value: A.5.1 types every one as xsd:base64Binary."""
    return base64.b64encode(str(value).encode("utf-8")).decode("ascii")


def _access_point_type(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine (DNS) name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id is not an address
    except ValueError:
        return "1"
    return "2"


def audit_message(row: dict[str, Any], *, source_id: str) -> ET.Element:
    """One AuditMessage element for one audit row (``FIELDS`` of ``ainode audit export``)."""
    event = str(row["event"])
    code = event_code(event)
    msg = ET.Element("AuditMessage")
    ident = ET.SubElement(msg, "EventIdentification", {
        "EventActionCode": code.action,
        "EventDateTime": _ts(row["ts"]),
        "EventOutcomeIndicator": _OUTCOME.get(str(row.get("outcome")), "4"),
    })
    _code(ident, "EventID", code.code, code.meaning)
    # The node's own event name, so nothing is lost in the coding.
    _code(ident, "EventTypeCode", event, event, system="99AINODE")
    details = row.get("details") or {}
    reason = details.get("reason") or details.get("error")
    if reason and row.get("outcome") != "success":
        ET.SubElement(ident, "EventOutcomeDescription").text = _x(str(reason)[:1024])
    actor = row.get("actor")
    if actor or row.get("host"):
        attrs = {"UserID": _x(actor or "unknown"), "UserIsRequestor": "true"}
        if row.get("host"):
            host = _x(row["host"])
            attrs["NetworkAccessPointID"] = host
            attrs["NetworkAccessPointTypeCode"] = _access_point_type(host)
        part = ET.SubElement(msg, "ActiveParticipant", attrs)
        _code(part, "RoleIDCode", "110153", "Source Role ID")
    node = ET.SubElement(msg, "ActiveParticipant",
                         {"UserID": _x(source_id), "UserIsRequestor": "false"})
    _code(node, "RoleIDCode", "110152", "Destination Role ID")
    ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": _x(source_id)})
    if row.get("study_uid"):
        obj = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _x(row["study_uid"]),
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        })
        _code(obj, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        for key, what in (("series_uid", "SeriesInstanceUID"),
                          ("sop_instance_uid", "SOPInstanceUID")):
            if row.get(key):
                ET.SubElement(obj, "ParticipantObjectDetail",
                              {"type": what, "value": _b64(row[key])})
    return msg


def audit_messages(rows: Iterable[dict[str, Any]], *, source_id: str) -> Iterable[bytes]:
    """Each row as one UTF-8 XML document (no declaration), ready for a file or syslog."""
    for row in rows:
        yield ET.tostring(audit_message(row, source_id=source_id), encoding="utf-8")


@cache
def schema() -> Any:
    """The compiled PS3.15 A.5.1 schema (an ``lxml.etree.RelaxNG``), loaded once.

    lxml is imported here, not at module level: only validation needs it (the
    ``dev`` extra), the node sends its messages without. ImportError says how to get it.
    """
    try:
        from lxml import etree
    except ImportError as exc:
        raise ImportError("validating audit messages needs lxml: pip install lxml") from exc
    with resources.files("node").joinpath(SCHEMA).open("rb") as fh:
        return etree.RelaxNG(etree.parse(fh))


def validate(xml: bytes | str | ET.Element) -> list[str]:
    """The ways ``xml`` breaks the PS3.15 A.5.1 schema, one line each; ``[]`` when valid.

    Checked against the schema rather than by our own reading of the standard,
    so a message an ATNA repository would refuse fails here first. Needs lxml
    (the ``dev`` extra); ImportError says so otherwise.
    """
    rng = schema()
    from lxml import etree

    if isinstance(xml, ET.Element):
        xml = ET.tostring(xml, encoding="utf-8")
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    try:
        doc = etree.fromstring(xml)
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed XML: {exc}"]
    if rng.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in rng.error_log]
