"""Persisting one received instance: spool file, database rows and audit row.

Why this lives apart from the network code: the C-STORE handler must only
persist, and everything that decides *what* to persist (duplicate or
conflict, which series, reopening a completed series) is storage policy that
the tests exercise without an association.

The order is what makes an acknowledgement safe:

1. refuse before writing anything (free-space floor, missing or invalid UIDs);
2. write the bytes as received, atomically and fsynced (``FileStore``);
3. one transaction: upsert study and series, insert the instance, reopen the
   series if it was already complete, add the audit row, commit (fsynced);
4. only then may the caller acknowledge.

A crash between 2 and 3 leaves a complete file without a row; the sender saw
no acknowledgement and sends again, and the retry finds the file with the same
hash and records it. A file is never replaced: a different dataset under a
stored SOP Instance UID goes to quarantine and raises ConflictError.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import IS, DSfloat
from sqlalchemy import Connection, Table, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from node.errors import ConflictError, InputError, OutOfSpaceError, StorageError
from storage.audit import audit
from storage.db import Database
from storage.filestore import FileStore, StoredFile, valid_uid
from storage.models import AuditEvent, Instance, Series, SeriesState, Study, utcnow

__all__ = [
    "ROUTING_KEYWORDS",
    "IngestOutcome",
    "IngestResult",
    "Ingestor",
    "InstanceHeader",
    "Peer",
    "read_header",
]

log = logging.getLogger(__name__)

# Attributes copied into Series.attributes for routing rules. Deliberately no
# patient identity: this JSON is shown by the CLI and read by rule code.
ROUTING_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "ContrastBolusAgent",
    "SliceThickness",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "ScanningSequence",
    "MRAcquisitionType",
    "ConvolutionKernel",
    "KVP",
    "Rows",
    "Columns",
    "SeriesNumber",
    "PatientPosition",
)
_IDENTITY_KEYWORDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDate")
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_HEADER_TAGS = list(
    dict.fromkeys(_UID_KEYWORDS + ROUTING_KEYWORDS + _IDENTITY_KEYWORDS + ("InstanceNumber",))
)


# Core tables for the receive path (statements on mapped classes go through the
# ORM's bulk machinery, several times the CPU of the same statement on a Table).
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes already stored: acknowledged, stored once


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent the instance; goes to the audit row, never to a log line."""

    ae_title: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few attributes the receiver reads; the rest of the dataset stays as received."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    instance_number: int | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: IngestOutcome
    instance_id: int
    series_id: int
    relpath: str
    reopened: bool = False


def _jsonable(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat | float):
        return float(value)
    if isinstance(value, int | bool):
        return value
    return str(value)


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def read_header(part10: bytes) -> InstanceHeader:
    """Parse only the UIDs and routing attributes of a Part 10 byte string.

    Raises InputError naming what is wrong; never returns a header whose UIDs
    could not serve as spool path components.
    """
    try:
        ds = pydicom.dcmread(
            BytesIO(part10), stop_before_pixels=True, specific_tags=_HEADER_TAGS
        )
        values = {k: ds.get(k) for k in _HEADER_TAGS}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError,
            NotImplementedError) as exc:
        raise InputError(f"unparseable dataset: {exc}") from exc
    uids: dict[str, str] = {}
    missing = []
    for keyword in _UID_KEYWORDS:
        raw = values.get(keyword)
        uid = str(raw).strip() if raw is not None else ""
        if not uid:
            missing.append(keyword)
        elif not valid_uid(uid):
            raise InputError(f"invalid {keyword} {uid!r}")
        uids[keyword] = uid
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    attributes: dict[str, Any] = {}
    for keyword in ROUTING_KEYWORDS:
        value = values.get(keyword)
        if value is not None and value != "":
            try:
                attributes[keyword] = _jsonable(value)
            except (TypeError, ValueError):
                continue  # a malformed optional attribute must not refuse the image
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        instance_number=_int(ds, "InstanceNumber"),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part=_text(ds, "BodyPartExamined", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
        attributes=attributes,
    )


def _audit(conn: Connection, now: datetime, event: str, *, outcome: str = "success",
           actor: str | None = None, host: str | None = None, study_uid: str | None = None,
           series_uid: str | None = None, sop_instance_uid: str | None = None,
           **details: Any) -> None:
    """storage.audit.audit for a Core connection: the receive path skips the ORM.

    Profiling the receive path showed the ORM's unit of work costing more CPU
    per instance than pynetdicom itself; the rows written are the same.
    """
    conn.execute(insert(_AUDIT).values(
        ts=now, event=event, outcome=outcome, actor=actor, host=host, study_uid=study_uid,
        series_uid=series_uid, sop_instance_uid=sop_instance_uid, job_id=None, details=details,
    ))


class Ingestor:
    """Records received instances; shared by every association thread of one process."""

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store

    # -- public --------------------------------------------------------------
    def ingest(
        self,
        part10: bytes,
        *,
        transfer_syntax_uid: str,
        peer: Peer,
        affected_sop_instance_uid: str | None = None,
    ) -> IngestResult:
        """Persist one instance (file + rows + audit) before the caller acknowledges it.

        Raises OutOfSpaceError (nothing written), InputError (nothing written),
        ConflictError (the new bytes kept in quarantine) or StorageError; each
        refusal is audited before it is raised.
        """
        try:
            self.store.check_space(len(part10))
        except OutOfSpaceError as exc:
            self._audit_refusal("instance.rejected", peer, "low_disk", str(exc),
                                sop_instance_uid=affected_sop_instance_uid)
            raise
        try:
            header = read_header(part10)
            if (affected_sop_instance_uid
                    and affected_sop_instance_uid.strip() != header.sop_instance_uid):
                raise InputError("dataset SOP Instance UID differs from the C-STORE request")
        except InputError as exc:
            self._audit_refusal("instance.rejected", peer, "bad_dataset", str(exc),
                                sop_instance_uid=affected_sop_instance_uid)
            raise
        sha = hashlib.sha256(part10).hexdigest()
        existing = self._existing(header.sop_instance_uid)
        if existing is not None:
            return self._repeat(existing, header, part10, sha, peer)
        try:
            stored = self.store.write_instance(
                header.study_uid, header.series_uid, header.sop_instance_uid, [part10]
            )
        except FileExistsError:
            # A complete file without a row: an earlier attempt crashed before its
            # commit (never acknowledged), or another association is mid-way.
            return self._orphan(header, part10, sha, transfer_syntax_uid, peer)
        except OSError as exc:
            raise StorageError(f"cannot write instance: {exc}") from exc
        return self._record(header, stored, transfer_syntax_uid, peer)

    # -- internals -------------------------------------------------------------
    def _existing(self, sop_uid: str) -> tuple[int, int, str, str] | None:
        try:
            with self.db.engine.connect() as s:
                row = s.execute(
                    select(Instance.id, Instance.series_id, Instance.sha256, Instance.path)
                    .where(Instance.sop_instance_uid == sop_uid)
                ).first()
        except SQLAlchemyError as exc:
            raise StorageError(f"database lookup failed: {exc}") from exc
        return None if row is None else (row[0], row[1], row[2], row[3])

    def _repeat(
        self,
        existing: tuple[int, int, str, str],
        header: InstanceHeader,
        part10: bytes,
        sha: str,
        peer: Peer,
    ) -> IngestResult:
        instance_id, series_id, old_sha, relpath = existing
        if old_sha == sha:
            with self.db.session() as s:
                audit(s, "instance.duplicate", outcome="success", actor=peer.ae_title,
                      host=peer.host, study_uid=header.study_uid,
                      series_uid=header.series_uid, sop_instance_uid=header.sop_instance_uid,
                      instance_id=instance_id, sha256=sha)
            log.info("duplicate instance acknowledged, stored once",
                     extra={"sop_instance_uid": header.sop_instance_uid})
            return IngestResult(IngestOutcome.DUPLICATE, instance_id, series_id, relpath)
        return self._conflict(header, part10, sha, peer, stored_sha=old_sha)

    def _conflict(
        self, header: InstanceHeader, part10: bytes, sha: str, peer: Peer, *, stored_sha: str
    ) -> IngestResult:
        kept = self.store.write_quarantine(header.sop_instance_uid, [part10])
        with self.db.session() as s:
            audit(s, "instance.conflict", outcome="failure", actor=peer.ae_title,
                  host=peer.host, study_uid=header.study_uid, series_uid=header.series_uid,
                  sop_instance_uid=header.sop_instance_uid, sha256=sha,
                  stored_sha256=stored_sha, quarantine=kept.relpath)
        log.warning("different dataset under a stored SOP Instance UID kept in quarantine",
                    extra={"sop_instance_uid": header.sop_instance_uid,
                           "quarantine": kept.relpath})
        raise ConflictError(
            f"SOP Instance UID {header.sop_instance_uid} is already stored with other content"
        )

    def _orphan(
        self, header: InstanceHeader, part10: bytes, sha: str, transfer_syntax_uid: str,
        peer: Peer,
    ) -> IngestResult:
        rel = self.store.spool_relpath(header.study_uid, header.series_uid,
                                       header.sop_instance_uid)
        path = self.store.spool_path(rel)
        on_disk = hashlib.sha256(path.read_bytes()).hexdigest()
        if on_disk != sha:
            return self._conflict(header, part10, sha, peer, stored_sha=on_disk)
        stored = StoredFile(path, rel, len(part10), sha)
        return self._record(header, stored, transfer_syntax_uid, peer)

    def _record(
        self, header: InstanceHeader, stored: StoredFile, transfer_syntax_uid: str, peer: Peer
    ) -> IngestResult:
        try:
            with self.db.engine.begin() as conn:
                return self._record_in(conn, header, stored, transfer_syntax_uid, peer)
        except IntegrityError:
            # Another association recorded the same SOP instance between our
            # lookup and our insert: it is now a plain repeat.
            existing = self._existing(header.sop_instance_uid)
            if existing is None:
                raise StorageError("instance insert failed on a constraint") from None
            return self._repeat(existing, header, stored.path.read_bytes(), stored.sha256, peer)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot record instance: {exc}") from exc

    def _record_in(
        self, s: Connection, header: InstanceHeader, stored: StoredFile, transfer_syntax_uid: str,
        peer: Peer,
    ) -> IngestResult:
        now = utcnow()
        insert = postgresql.insert if s.dialect.name == "postgresql" else sqlite.insert
        s.execute(
            insert(_STUDIES)
            .values(study_instance_uid=header.study_uid, patient_id=header.patient_id,
                    patient_name=header.patient_name,
                    accession_number=header.accession_number, study_date=header.study_date,
                    study_description=header.study_description, first_received_at=now,
                    last_received_at=now)
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
        )
        study_id = s.execute(
            update(_STUDIES).where(_STUDIES.c.study_instance_uid == header.study_uid)
            .values(last_received_at=now).returning(_STUDIES.c.id)
        ).scalar_one()
        s.execute(
            insert(_SERIES)
            .values(series_instance_uid=header.series_uid, study_id=study_id,
                    modality=header.modality, series_number=header.series_number,
                    series_description=header.series_description, body_part=header.body_part,
                    calling_ae=peer.ae_title, state=SeriesState.RECEIVING.value,
                    instance_count=0, size_bytes=0, attributes=header.attributes,
                    first_received_at=now, last_received_at=now, reopened_count=0)
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        )
        reopened = s.execute(
            update(_SERIES)
            .where(_SERIES.c.series_instance_uid == header.series_uid,
                   _SERIES.c.state != SeriesState.RECEIVING.value)
            .values(state=SeriesState.RECEIVING.value, completed_at=None,
                    reopened_count=_SERIES.c.reopened_count + 1)
            .returning(_SERIES.c.id)
        ).first() is not None
        series_id = s.execute(
            update(_SERIES).where(_SERIES.c.series_instance_uid == header.series_uid)
            .values(instance_count=_SERIES.c.instance_count + 1,
                    size_bytes=_SERIES.c.size_bytes + stored.size, last_received_at=now)
            .returning(_SERIES.c.id)
        ).scalar_one()
        instance_id = s.execute(
            insert(_INSTANCES)
            .values(sop_instance_uid=header.sop_instance_uid, series_id=series_id,
                    sop_class_uid=header.sop_class_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    instance_number=header.instance_number, path=stored.relpath,
                    size_bytes=stored.size, sha256=stored.sha256, calling_ae=peer.ae_title,
                    received_at=now)
            .returning(_INSTANCES.c.id)
        ).scalar_one()
        if reopened:
            _audit(s, now, "series.reopened", outcome="warning", actor=peer.ae_title,
                   host=peer.host, study_uid=header.study_uid, series_uid=header.series_uid,
                   sop_instance_uid=header.sop_instance_uid)
            log.info("series reopened by a late instance",
                     extra={"series_uid": header.series_uid})
        _audit(s, now, "instance.received", actor=peer.ae_title, host=peer.host,
              study_uid=header.study_uid, series_uid=header.series_uid,
              sop_instance_uid=header.sop_instance_uid, instance_id=instance_id,
              size=stored.size, transfer_syntax=transfer_syntax_uid)
        return IngestResult(IngestOutcome.STORED, instance_id, series_id, stored.relpath,
                            reopened=reopened)

    def _audit_refusal(
        self, event: str, peer: Peer, reason: str, message: str, *,
        sop_instance_uid: str | None,
    ) -> None:
        sop = sop_instance_uid if sop_instance_uid and valid_uid(sop_instance_uid) else None
        try:
            with self.db.session() as s:
                audit(s, event, outcome="failure", actor=peer.ae_title, host=peer.host,
                      sop_instance_uid=sop, reason=reason, error=message[:500])
        except SQLAlchemyError:
            log.exception("could not audit a refused instance", extra={"reason": reason})
        log.warning("instance refused", extra={"reason": reason, "sop_instance_uid": sop})

