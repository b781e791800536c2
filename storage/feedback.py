"""Readers' feedback: a verdict per finding and a reference diagnosis per series, audited.

Why in storage: the CLI, the REST API, the console and (later) a Key Object
Selection from the PACS all record the same two things; one function each
checks the input, appends the row and writes its audit row in the same
transaction, so no verdict exists without the record of who gave it.

Rows are appended, never updated. What counts is the newest verdict of each
(finding, reader) pair and the newest reference of each series
(``latest_verdicts``, ``latest_references``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import audit
from storage.errors import InputError
from storage.models import (
    Finding,
    FindingVerdict,
    Job,
    ReferenceDiagnosis,
    Series,
)

__all__ = [
    "NEGATIVE_DIAGNOSES",
    "VERDICTS",
    "Reference",
    "latest_references",
    "latest_verdicts",
    "record_reference",
    "record_verdict",
    "series_by_uid",
]

VERDICTS = ("agree", "disagree", "uncertain")
# Reference diagnoses that mean "the disease the models look for is absent" unless the
# caller says otherwise with ``positive``.
NEGATIVE_DIAGNOSES = frozenset({"normal", "negative", "no finding", "none", "benign"})
_SOURCES = ("cli", "web", "api", "dicom", "feedback", "sr", "csv")


@dataclass(frozen=True, slots=True)
class Reference:
    """The reference diagnosis that counts for one series."""

    series_id: int
    diagnosis: str
    positive: bool
    source: str
    created_at: datetime


def series_by_uid(session: Session, series_uid: str) -> Series:
    series = session.scalars(select(Series).where(
        Series.series_instance_uid == series_uid)).first()
    if series is None:
        raise InputError(f"no received series {series_uid}")
    return series


def record_verdict(session: Session, finding_id: int, verdict: str, *, reader: str,
                   comment: str | None = None, source: str = "cli") -> FindingVerdict:
    """Append a reader's verdict on finding ``finding_id``, audited as ``finding.verdict``.

    Refused (InputError): an unknown verdict, an unknown finding, and the patient-level
    row of a job that scored nothing ("no finding"): there is nothing there to agree with.
    """
    verdict = verdict.strip().lower()
    if verdict not in VERDICTS:
        raise InputError(f"unknown verdict {verdict!r}; one of {', '.join(VERDICTS)}")
    if source not in _SOURCES:
        raise InputError(f"unknown feedback source {source!r}")
    if not reader.strip():
        raise InputError("a verdict needs the reader's name")
    finding = session.get(Finding, finding_id)
    if finding is None:
        raise InputError(f"no finding {finding_id}")
    if finding.probability is None:
        raise InputError(f"finding {finding_id} is {finding.label!r}, not a scored finding")
    job = finding.job
    row = FindingVerdict(finding_id=finding_id, verdict=verdict, reader=reader[:128],
                         comment=(comment or None), source=source)
    session.add(row)
    audit(session, "finding.verdict", actor=reader[:128], job_id=job.id,
          study_uid=job.series.study.study_instance_uid,
          series_uid=job.series.series_instance_uid, finding_id=finding_id,
          verdict=verdict, source=source, commented=bool(comment))
    session.flush()
    return row


def record_reference(session: Session, series_uid: str, diagnosis: str, *, reader: str,
                     positive: bool | None = None, comment: str | None = None,
                     source: str = "feedback") -> ReferenceDiagnosis:
    """Append the reference diagnosis of a series, audited as ``series.reference``.

    ``positive`` defaults to "not one of NEGATIVE_DIAGNOSES"; a site whose words differ
    says it explicitly.
    """
    diagnosis = diagnosis.strip()
    if not diagnosis or len(diagnosis) > 64:
        raise InputError("a reference diagnosis is 1 to 64 characters")
    if source not in _SOURCES:
        raise InputError(f"unknown reference source {source!r}")
    if not reader.strip():
        raise InputError("a reference diagnosis needs the reader's name")
    series = series_by_uid(session, series_uid)
    pos = diagnosis.lower() not in NEGATIVE_DIAGNOSES if positive is None else positive
    row = ReferenceDiagnosis(series_id=series.id, diagnosis=diagnosis, positive=pos,
                             source=source, comment=comment or None, reader=reader[:128])
    session.add(row)
    audit(session, "series.reference", actor=reader[:128],
          study_uid=series.study.study_instance_uid, series_uid=series_uid,
          diagnosis=diagnosis, positive=pos, source=source)
    session.flush()
    return row


def latest_verdicts(session: Session, finding_ids: Iterable[int]) -> dict[int, list[str]]:
    """Finding id -> the verdicts that count (the newest per reader), oldest reader first."""
    ids = list(finding_ids)
    out: dict[int, dict[str, str]] = {}
    for start in range(0, len(ids), 500):
        rows = session.scalars(select(FindingVerdict).where(
            FindingVerdict.finding_id.in_(ids[start:start + 500]))
            .order_by(FindingVerdict.created_at, FindingVerdict.id))
        for r in rows:
            out.setdefault(r.finding_id, {})[r.reader] = r.verdict
    return {fid: list(by_reader.values()) for fid, by_reader in out.items()}


def latest_references(session: Session, series_ids: Iterable[int] | None = None,
                      ) -> dict[int, Reference]:
    """Series id -> its newest reference diagnosis (all series when ``series_ids`` is None)."""
    q = select(ReferenceDiagnosis).order_by(ReferenceDiagnosis.created_at,
                                            ReferenceDiagnosis.id)
    if series_ids is not None:
        q = q.where(ReferenceDiagnosis.series_id.in_(list(series_ids)))
    return {r.series_id: Reference(r.series_id, r.diagnosis, r.positive, r.source,
                                   r.created_at) for r in session.scalars(q)}


def finding_series(session: Session, finding_id: int) -> tuple[Job, Series]:
    finding = session.get(Finding, finding_id)
    if finding is None:
        raise InputError(f"no finding {finding_id}")
    return finding.job, finding.job.series
