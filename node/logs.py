"""Structured logging with a PHI guard.

Library code logs with ``logging.getLogger(__name__)`` and puts identifiers in
``extra`` (``study_uid``, ``series_uid``, ``job_id``...); only the CLI calls
:func:`configure`. Patient identities belong in the audit table, never in a log
line, so :class:`PhiFilter` drops any PHI-named field a caller passes by mistake.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PHI_FIELDS", "JsonFormatter", "KeyValueFormatter", "PhiFilter", "configure"]

# Attribute names (snake case and DICOM keywords) that identify a patient.
PHI_FIELDS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "birth_date",
        "accession_number",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientAddress",
    }
)

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class PhiFilter(logging.Filter):
    """Redact PHI-named fields from a record's extras before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in PHI_FIELDS.intersection(record.__dict__):
            setattr(record, key, "[redacted]")
        return True


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=INFO logger=node.scp msg="stored" series_uid=1.2.3`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in sorted(_extras(record).items())]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v if isinstance(v, int | float | bool) else str(v)
                    for k, v in _extras(record).items()})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=True)


def configure(level: str = "INFO", fmt: str = "keyvalue", file: Path | None = None) -> None:
    """Install the node's single handler on the root logger (CLI entry points only)."""
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and dataset contents at some levels:
    # keep it at WARNING so no dataset (and no PHI) reaches the log.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # APScheduler logs every run of every interval job at INFO (series completion runs
    # each second): that would bury the node's own INFO lines.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
