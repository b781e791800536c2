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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.secrets import mask_text

__all__ = ["PHI_FIELDS", "JsonFormatter", "KeyValueFormatter", "PhiFilter", "SchedulerSkipFilter",
           "configure"]

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


class _Masking(logging.Formatter):
    """Masks secrets in the whole line (message, extras, traceback) as the last step.

    Why on the finished line: a secret can arrive in any part of it, e.g. a
    driver's exception text quoting the database URL.
    """

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return mask_text(self.render(record), self.secrets)

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class KeyValueFormatter(_Masking):
    """``ts=... level=INFO logger=node.scp msg="stored" series_uid=1.2.3`` lines."""

    def render(self, record: logging.LogRecord) -> str:
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


class JsonFormatter(_Masking):
    """One JSON object per line, for log shippers."""

    def render(self, record: logging.LogRecord) -> str:
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


class SchedulerSkipFilter(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances reached".

    Why: every periodic task runs with ``max_instances=1`` and ``coalesce`` on
    purpose (node.orchestration), so a slow run (the first routing loads the
    models) skipping its next tick is the design working, not a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


# Libraries that say at INFO what only a developer needs (alembic's "Context impl
# SQLiteImpl", highdicom's per-frame notes): WARNING unless --verbose.
_CHATTY = ("alembic", "highdicom")


def configure(level: str = "INFO", fmt: str = "keyvalue", file: Path | None = None, *,
              verbose: bool = False, secrets: Sequence[str] = ()) -> None:
    """Install the node's single handler on the root logger (CLI entry points only).

    ``secrets``: values to mask verbatim in every line, on top of URL passwords.
    """
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else KeyValueFormatter(secrets))
    handler.addFilter(PhiFilter())
    handler.addFilter(SchedulerSkipFilter())
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
    for name in _CHATTY:
        logging.getLogger(name).setLevel(root.level if verbose else max(logging.WARNING,
                                                                        root.level))
    if not verbose:
        # highdicom warns about the source header (a one-component PatientName...), and
        # quotes the value: that is PHI in a log, and nothing the admin can act on per job.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\..*)?$")
    # pydicom's decoder plug-ins log their own traceback at ERROR for every plug-in that
    # fails; the node reports the failure itself, in one line (pipelines.dicom_out).
    logging.getLogger("pydicom.pixels.decoders").setLevel(
        root.level if verbose else logging.CRITICAL)
