"""Audit rows as DICOM audit messages (PS3.15 A.5, the schema IHE ATNA validates against).

Why a mapping table rather than free text: a SIEM or an ATNA audit record
repository files messages by their coded EventID (DCM 1101xx) and outcome
indicator, so each of the node's event names is given the PS3.15 A.5.3
message it is an instance of; an event the table does not know is an
Application Activity message with the node's own event name as its type.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.etree import ElementTree as ET

__all__ = ["EventCode", "audit_message", "audit_messages", "event_code"]


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


def _code(parent: ET.Element, tag: str, code: str, meaning: str,
          system: str = _DCM) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system,
                                       "originalText": meaning})


def _ts(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


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
        ET.SubElement(ident, "EventOutcomeDescription").text = str(reason)[:1024]
    actor = row.get("actor")
    if actor or row.get("host"):
        attrs = {"UserID": str(actor or "unknown"), "UserIsRequestor": "true"}
        if row.get("host"):
            attrs["NetworkAccessPointID"] = str(row["host"])
            attrs["NetworkAccessPointTypeCode"] = "2"  # IP address
        part = ET.SubElement(msg, "ActiveParticipant", attrs)
        _code(part, "RoleIDCode", "110153", "Source Role ID")
    node = ET.SubElement(msg, "ActiveParticipant",
                         {"UserID": source_id, "UserIsRequestor": "false"})
    _code(node, "RoleIDCode", "110152", "Destination Role ID")
    ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if row.get("study_uid"):
        obj = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(row["study_uid"]),
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        })
        _code(obj, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        for key, what in (("series_uid", "SeriesInstanceUID"),
                          ("sop_instance_uid", "SOPInstanceUID")):
            if row.get(key):
                ET.SubElement(obj, "ParticipantObjectDetail",
                              {"type": what, "value": str(row[key])})
    return msg


def audit_messages(rows: Iterable[dict[str, Any]], *, source_id: str) -> Iterable[bytes]:
    """Each row as one UTF-8 XML document (no declaration), ready for a file or syslog."""
    for row in rows:
        yield ET.tostring(audit_message(row, source_id=source_id), encoding="utf-8")
