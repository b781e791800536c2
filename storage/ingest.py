"""Persisting one received instance: spool file, database rows and audit row.

Why this lives apart from the network code: the C-STORE handler must only
persist, and everything that decides *what* to persist (duplicate or
conflict, which series, reopening a completed series) is storage policy that
the tests exercise without an association.

The order is what makes an acknowledgement safe:

1. refuse before writing anything (free-space floor, missing or invalid UIDs);
2. write the bytes as received, atomically and fsynced (``FileStore``: the
   file's data, then its directory entry);
3. one transaction: upsert study and series, insert the instance, reopen the
   series if it was already complete, add the audit row, commit (fsynced);
4. only then may the caller acknowledge.

Speed without weakening 2-4 (see bench/RESULTS.md): there is no look-up
before the write (an existing file or the insert's ON CONFLICT reveals a
repeat), the statements are compiled once (``_Compiled``), and step 3 goes
through one commit thread per process (``_GroupCommitter``) so that rows of
concurrent associations share a transaction and its fsync while each sender
still waits for its own row to be durable.

A crash between 2 and 3 leaves a complete file without a row; the sender saw
no acknowledgement and sends again, and the retry finds the file with the same
hash and records it. A file is never replaced: a different dataset under a
stored SOP Instance UID goes to quarantine and raises ConflictError.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import Dialect, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from storage.audit import audit
from storage.db import Database
from storage.dicom_values import json_value
from storage.errors import ConflictError, InputError, OutOfSpaceError, StorageError
from storage.filestore import FileStore, StoredFile, valid_uid
from storage.models import AuditEvent, Instance, Series, SeriesState, Study, utcnow
from storage.part10 import scan as part10_scan

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


def _text(values: dict[str, Any], keyword: str, limit: int) -> str | None:
    value = values.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(values: dict[str, Any], keyword: str) -> int | None:
    value = values.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _pydicom_values(part10: bytes) -> dict[str, Any]:
    try:
        ds = pydicom.dcmread(
            BytesIO(part10), stop_before_pixels=True, specific_tags=_HEADER_TAGS
        )
        return {k: ds.get(k) for k in _HEADER_TAGS}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError,
            NotImplementedError) as exc:
        raise InputError(f"unparseable dataset: {exc}") from exc


def read_header(part10: bytes) -> InstanceHeader:
    """Parse only the UIDs and routing attributes of a Part 10 byte string.

    The plain case goes through ``storage.part10.scan`` (a fraction of the
    CPU, on the thread the sender waits on); whatever it is unsure of is read
    by pydicom. Raises InputError naming what is wrong; never returns a
    header whose UIDs could not serve as spool path components.
    """
    values = part10_scan(part10, _HEADER_TAGS)
    if values is None:
        values = _pydicom_values(part10)
    return _header(values)


def _header(values: dict[str, Any]) -> InstanceHeader:
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
                attributes[keyword] = json_value(value)
            except (TypeError, ValueError):
                continue  # a malformed optional attribute must not refuse the image
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        instance_number=_int(values, "InstanceNumber"),
        modality=_text(values, "Modality", 16),
        series_number=_int(values, "SeriesNumber"),
        series_description=_text(values, "SeriesDescription", 64),
        body_part=_text(values, "BodyPartExamined", 16),
        patient_id=_text(values, "PatientID", 64),
        patient_name=_text(values, "PatientName", 324),
        accession_number=_text(values, "AccessionNumber", 16),
        study_date=_text(values, "StudyDate", 8),
        study_description=_text(values, "StudyDescription", 64),
        attributes=attributes,
    )


_RECEIVING = SeriesState.RECEIVING.value


class _Compiled:
    """One Core statement compiled once for the engine's dialect, run on a DBAPI cursor.

    Why: building and compiling a SQLAlchemy statement per execution cost more
    CPU per instance than pynetdicom's whole receive path (profiled at about
    4 ms for the five statements). The SQL text and the column types' bind
    processors (UTC datetimes, JSON) come from SQLAlchemy, so the rows written
    are byte-for-byte what the ORM would write; only the per-call work is gone.
    """

    __slots__ = ("fixed", "order", "processors", "sql")

    def __init__(self, stmt: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect))
        self.sql: str = compiled.string
        self.order: Sequence[str] | None = compiled.positiontup
        self.processors: dict[str, Callable[[Any], Any]] = {}
        self.fixed: dict[str, Any] = {}  # literals in the statement (e.g. ``count + 1``)
        for key, bind in compiled.binds.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.processors[key] = proc
            if not bind.required:
                self.fixed[key] = proc(bind.effective_value) if proc else bind.effective_value

    def params(self, values: dict[str, Any]) -> Any:
        procs = self.processors
        done = {k: (procs[k](v) if k in procs else v) for k, v in values.items()}
        done.update(self.fixed)
        return done if self.order is None else [done[k] for k in self.order]

    def run(self, cursor: Any, values: dict[str, Any]) -> Any:
        cursor.execute(self.sql, self.params(values))
        return cursor


def _receive_statements(dialect: Dialect) -> dict[str, _Compiled]:
    """The receive path's statements; the instance insert doubles as the duplicate check.

    ``ON CONFLICT DO NOTHING RETURNING id`` on the instance answers "already
    recorded?" inside the same transaction, so there is no separate look-up
    before the write and no exception on the common path.
    """
    ins = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    b = bindparam
    study_rows = ins(_STUDIES).values(
        study_instance_uid=b("study_uid"), patient_id=b("patient_id"),
        patient_name=b("patient_name"), accession_number=b("accession_number"),
        study_date=b("study_date"), study_description=b("study_description"),
        first_received_at=b("now"), last_received_at=b("now"))
    study = study_rows.on_conflict_do_update(
        index_elements=["study_instance_uid"],
        set_={"last_received_at": study_rows.excluded.last_received_at},
    ).returning(_STUDIES.c.id)
    series_rows = ins(_SERIES).values(
        series_instance_uid=b("series_uid"), study_id=b("study_id"), modality=b("modality"),
        series_number=b("series_number"), series_description=b("series_description"),
        body_part=b("body_part"), calling_ae=b("calling_ae"), state=b("receiving"),
        instance_count=b("zero"), size_bytes=b("zero"),
        attributes=b("attributes", type_=_SERIES.c.attributes.type),
        first_received_at=b("now"), last_received_at=b("now"), reopened_count=b("zero"))
    series = series_rows.on_conflict_do_update(
        index_elements=["series_instance_uid"],
        set_={"last_received_at": series_rows.excluded.last_received_at},
    ).returning(_SERIES.c.id, _SERIES.c.state)
    instance = ins(_INSTANCES).values(
        sop_instance_uid=b("sop_uid"), series_id=b("series_id"), sop_class_uid=b("sop_class_uid"),
        transfer_syntax_uid=b("transfer_syntax_uid"), instance_number=b("instance_number"),
        path=b("path"), size_bytes=b("size"), sha256=b("sha256"), calling_ae=b("calling_ae"),
        received_at=b("now"),
    ).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(_INSTANCES.c.id)
    counts = update(_SERIES).where(_SERIES.c.id == b("series_id")).values(
        instance_count=_SERIES.c.instance_count + 1,
        size_bytes=_SERIES.c.size_bytes + b("size"), last_received_at=b("now"))
    reopen = update(_SERIES).where(_SERIES.c.id == b("series_id")).values(
        instance_count=_SERIES.c.instance_count + 1,
        size_bytes=_SERIES.c.size_bytes + b("size"), last_received_at=b("now"),
        state=b("receiving"), completed_at=None, reopened_count=_SERIES.c.reopened_count + 1)
    audit_row = insert(_AUDIT).values(
        ts=b("now"), event=b("event"), outcome=b("outcome"), actor=b("actor"), host=b("host"),
        study_uid=b("study_uid"), series_uid=b("series_uid"), sop_instance_uid=b("sop_uid"),
        job_id=b("job_id"), details=b("details", type_=_AUDIT.c.details.type))
    stmts: dict[str, ClauseElement] = {
        "study": study, "series": series, "instance": instance, "counts": counts,
        "reopen": reopen, "audit": audit_row,
    }
    return {name: _Compiled(stmt, dialect) for name, stmt in stmts.items()}


@dataclass(frozen=True, slots=True)
class _Row:
    """What one received instance adds to the database."""

    header: InstanceHeader
    stored: StoredFile
    transfer_syntax_uid: str
    peer: Peer


@dataclass(frozen=True, slots=True)
class _Recorded:
    instance_id: int
    series_id: int
    reopened: bool


_STOP = object()


class _WriterTurn:
    """An exclusive flock on a file beside the SQLite database, held around one commit.

    Advisory and only among receive-path committers (other writers still meet
    SQLite's own locking); the kernel releases it if the process dies.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _GroupCommitter:
    """One thread that commits the rows of every association of this process.

    Why: the commit's fsync (SQLite WAL, synchronous=FULL; PostgreSQL's WAL
    flush) is the largest single cost of a store after the file's own fsync.
    Association threads hand their row here and block until the transaction
    that contains it has committed, so each sender is still acknowledged only
    after its own row is durable; but rows that arrive while a commit is in
    progress share the next transaction and its one fsync (group commit). Each
    row runs under its own SAVEPOINT, so one failing row fails alone; a failed
    COMMIT fails every row of the batch, none of which has been acknowledged.

    With SQLite and several receiver processes, the committers of the
    processes take turns through a lock file (``_WriterTurn``) before BEGIN
    IMMEDIATE: SQLite's own busy handler polls a held write lock with sleeps
    of 1, 2, 5, 10 ms..., which with four senders cost a mean 1.3 ms (up to
    12 ms) per commit; a blocking flock hands the turn over the moment the
    holder is done, and rows queue meanwhile, so the next turn commits them
    together.

    The thread keeps one connection for its lifetime instead of taking one
    from the pool per batch: pool checkout and return cost Python time on
    every commit, and the pool hands out its idle connections in turn, each of
    which finds the database changed since its last use and re-reads the pages
    it needs (about 18 page reads a row with SQLite). A connection that failed
    is invalidated and the next batch opens a fresh one.
    """

    def __init__(self, db: Database, *, max_batch: int = 64) -> None:
        self._db = db
        self._max_batch = max_batch
        self._stmts = _receive_statements(db.engine.dialect)
        self._sqlite = db.engine.dialect.name == "sqlite"
        database = db.engine.url.database if self._sqlite else None
        on_disk = database not in (None, "", ":memory:") and not str(database).startswith("file:")
        self._turn = _WriterTurn(Path(f"{database}-ingest.lock")) if on_disk else None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: Any = None  # the commit thread's own, opened by its first batch

    def submit(self, row: _Row) -> Future[_Recorded | None]:
        """Queue ``row``; the future resolves once it is committed (None: already recorded)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ingest-commit",
                                                daemon=True)
                self._thread.start()
        done: Future[_Recorded | None] = Future()
        self._queue.put((row, done))
        return done

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout=10)
        if self._turn is not None and (thread is None or not thread.is_alive()):
            self._turn.close()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # finish this batch, then stop
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[tuple[_Row, Future[_Recorded | None]]]) -> None:
        results: list[_Recorded | BaseException | None] = []
        conn = self._conn
        if conn is None:
            try:
                conn = self._conn = self._db.engine.raw_connection()
            except Exception as exc:  # SQLAlchemyError or the driver's own
                for _, done in batch:
                    done.set_exception(StorageError(f"cannot open the database: {exc}"))
                return
        stack = contextlib.ExitStack()
        try:
            cur = conn.cursor()
            if self._turn is not None:
                stack.enter_context(self._turn)
            if self._sqlite:
                # Take the write lock up front: a deferred transaction that reads
                # first can deadlock against another receiver process.
                cur.execute("BEGIN IMMEDIATE")
            for row, _ in batch:
                cur.execute("SAVEPOINT ingest_row")
                try:
                    results.append(self._insert(cur, row))
                    cur.execute("RELEASE SAVEPOINT ingest_row")
                except _AlreadyRecordedError:
                    cur.execute("ROLLBACK TO SAVEPOINT ingest_row")
                    cur.execute("RELEASE SAVEPOINT ingest_row")
                    results.append(None)
                except Exception as exc:
                    cur.execute("ROLLBACK TO SAVEPOINT ingest_row")
                    cur.execute("RELEASE SAVEPOINT ingest_row")
                    results.append(StorageError(f"cannot record instance: {exc}"))
            conn.commit()
        except Exception as exc:
            try:
                conn.rollback()
            except Exception:
                log.exception("rollback after a failed ingest commit failed")
            conn.invalidate()
            self._conn = None
            for _, done in batch:
                done.set_exception(StorageError(f"cannot commit received instances: {exc}"))
            return
        finally:
            stack.close()
        for (row, done), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                if result is not None and result.reopened:
                    log.info("series reopened by a late instance",
                             extra={"series_uid": row.header.series_uid})
                done.set_result(result)

    def _insert(self, cur: Any, row: _Row) -> _Recorded | None:
        st, h, stored, peer = self._stmts, row.header, row.stored, row.peer
        now = utcnow()
        study_id = st["study"].run(cur, {
            "study_uid": h.study_uid, "patient_id": h.patient_id, "patient_name": h.patient_name,
            "accession_number": h.accession_number, "study_date": h.study_date,
            "study_description": h.study_description, "now": now,
        }).fetchone()[0]
        series_id, state = st["series"].run(cur, {
            "series_uid": h.series_uid, "study_id": study_id, "modality": h.modality,
            "series_number": h.series_number, "series_description": h.series_description,
            "body_part": h.body_part, "calling_ae": peer.ae_title, "receiving": _RECEIVING,
            "attributes": h.attributes, "now": now, "zero": 0,
        }).fetchone()
        inserted = st["instance"].run(cur, {
            "sop_uid": h.sop_instance_uid, "series_id": series_id,
            "sop_class_uid": h.sop_class_uid, "transfer_syntax_uid": row.transfer_syntax_uid,
            "instance_number": h.instance_number, "path": stored.relpath, "size": stored.size,
            "sha256": stored.sha256, "calling_ae": peer.ae_title, "now": now,
        }).fetchone()
        if inserted is None:
            # Already recorded (another association, or the same SOP instance under
            # other Study/Series UIDs): undo the upserts, the caller decides.
            raise _AlreadyRecordedError
        reopened = state != _RECEIVING
        st["reopen" if reopened else "counts"].run(cur, {
            "series_id": series_id, "size": stored.size, "now": now, "receiving": _RECEIVING,
        })
        ids = {"actor": peer.ae_title, "host": peer.host, "study_uid": h.study_uid,
               "series_uid": h.series_uid, "sop_uid": h.sop_instance_uid, "now": now,
               "job_id": None}
        if reopened:
            st["audit"].run(cur, {**ids, "event": "series.reopened", "outcome": "warning",
                                  "details": {}})
        st["audit"].run(cur, {**ids, "event": "instance.received", "outcome": "success",
                              "details": {"instance_id": inserted[0], "size": stored.size,
                                          "transfer_syntax": row.transfer_syntax_uid}})
        return _Recorded(int(inserted[0]), int(series_id), reopened)


class _AlreadyRecordedError(Exception):
    """Internal: the instance row exists; the row's savepoint is rolled back."""


class Ingestor:
    """Records received instances; shared by every association thread of one process."""

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store
        self._committer = _GroupCommitter(db)

    def close(self) -> None:
        """Stop the commit thread and close its connection."""
        self._committer.close()

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
        # No look-up before the write: the spool path is a function of the UIDs,
        # so an existing file (link() refuses to replace it) or an existing row
        # (the insert's ON CONFLICT) is how a repeat shows itself.
        try:
            held = self.store.write_instance_held(
                header.study_uid, header.series_uid, header.sop_instance_uid, [part10],
                sync=False,
            )
        except FileExistsError:
            sha = hashlib.sha256(part10).hexdigest()
            return self._file_exists(header, part10, sha, transfer_syntax_uid, peer)
        except OSError as exc:
            raise StorageError(f"cannot write instance: {exc}") from exc
        # The file stays locked until its row is committed (or refused): a concurrent
        # store of the same SOP instance waits for the outcome instead of guessing.
        # Its fsync runs while the row commits: the two waits on the disk overlap.
        with held:
            return self._record(header, held.stored, transfer_syntax_uid, peer, part10,
                                durable=held.sync)

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

    def _file_exists(
        self, header: InstanceHeader, part10: bytes, sha: str, transfer_syntax_uid: str,
        peer: Peer,
    ) -> IngestResult:
        """The spool already has a file for this SOP instance: a repeat, a conflict, or
        the leftover of a store that never completed (so was never acknowledged)."""
        rel = self.store.spool_relpath(header.study_uid, header.series_uid,
                                       header.sop_instance_uid)
        try:
            held = self.store.lock_existing(rel)  # waits while its writer is at work
        except FileNotFoundError as exc:  # removed meanwhile: the sender will retry
            raise StorageError(f"spool file {rel} vanished during the store") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {rel}: {exc}") from exc
        with held:
            existing = self._existing(header.sop_instance_uid)
            if existing is not None:
                return self._repeat(existing, header, part10, sha, peer)
            if held.stored.sha256 == sha:
                # A complete file without a row: the earlier attempt crashed before
                # its commit. Record it now.
                return self._record(header, held.stored, transfer_syntax_uid, peer, part10)
            # Different bytes and no row: a store that crashed before its data was
            # durable (or never finished). Nobody was told it was stored; replace it,
            # still holding the old file's lock so no one else decides meanwhile.
            log.warning("unrecorded partial spool file replaced",
                        extra={"sop_instance_uid": header.sop_instance_uid})
            try:
                fresh = self.store.replace_unrecorded(rel, [part10])
            except OSError as exc:
                raise StorageError(f"cannot write instance: {exc}") from exc
            with fresh:
                return self._record(header, fresh.stored, transfer_syntax_uid, peer, part10)

    def _record(
        self, header: InstanceHeader, stored: StoredFile, transfer_syntax_uid: str, peer: Peer,
        part10: bytes, *, durable: Callable[[], None] | None = None,
    ) -> IngestResult:
        """Commit the row; with ``durable``, make the file durable while it commits.

        Either way the caller acknowledges only after both. The row may reach
        the disk a moment before the file; a power cut in that moment leaves a
        row for an unacknowledged instance whose file is incomplete, which
        ``verify_recent`` finds and removes at the next start.
        """
        pending = self._committer.submit(_Row(header, stored, transfer_syntax_uid, peer))
        if durable is not None:
            try:
                durable()
            except OSError as exc:
                try:
                    done = pending.result()
                except StorageError:
                    done = None
                if done is not None:
                    self._forget(done, stored, reason=f"fsync failed: {exc}")
                raise StorageError(f"cannot make the instance durable: {exc}") from exc
        recorded = pending.result()
        if recorded is not None:
            return IngestResult(IngestOutcome.STORED, recorded.instance_id, recorded.series_id,
                                stored.relpath, reopened=recorded.reopened)
        # The SOP instance is already recorded: by another association between our
        # write and our commit, or under other Study/Series UIDs (another path).
        existing = self._existing(header.sop_instance_uid)
        if existing is None:
            raise StorageError("instance insert conflicted but no row was found")
        if existing[3] != stored.relpath:
            # Our file at the other path is recorded nowhere and was never acknowledged.
            stored.path.unlink(missing_ok=True)
        return self._repeat(existing, header, part10, stored.sha256, peer)

    def _forget(self, recorded: _Recorded, stored: StoredFile, *, reason: str) -> None:
        """Undo a committed row whose file could not be made durable (never acknowledged)."""
        try:
            with self.db.session() as s:
                _remove_rows(s, [(recorded.instance_id, recorded.series_id, stored.size)])
                audit(s, "instance.write_failed", outcome="failure",
                      instance_id=recorded.instance_id, reason=reason[:500])
        except SQLAlchemyError:
            log.exception("could not undo the row of an instance that failed to write")
        stored.path.unlink(missing_ok=True)

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



def _remove_rows(session: Any, rows: Sequence[tuple[int, int, int]]) -> None:
    """Delete instance rows and take them off their series' counters."""
    for instance_id, series_id, size in rows:
        session.execute(delete(Instance).where(Instance.id == instance_id))
        session.execute(update(Series).where(Series.id == series_id).values(
            instance_count=Series.instance_count - 1, size_bytes=Series.size_bytes - size))


def verify_recent(db: Database, store: FileStore, window_s: float = 10.0) -> list[str]:
    """At start-up: check the files of the instances received last before the stop.

    A row is committed while its file's fsync is still running (see
    ``Ingestor._record``); after a power cut in that moment the row can name
    a file that is missing or incomplete. Such an instance was never
    acknowledged (acknowledgement waits for both), so its row is removed and
    audited and the sender's retry stores it afresh. Only the rows of the
    last ``window_s`` seconds before the newest one are read back: the fsync
    runs alongside the commit and ends milliseconds after it, so older rows'
    files were durable before the stop (and re-reading minutes of a busy
    node's traffic would hold up its start). Returns the SOP Instance UIDs removed.
    """
    removed: list[str] = []
    with db.session() as s:
        newest = s.scalar(select(func.max(Instance.received_at)))
        if newest is None:
            return removed
        rows = s.execute(
            select(Instance.id, Instance.series_id, Instance.size_bytes, Instance.path,
                   Instance.sha256, Instance.sop_instance_uid)
            .where(Instance.received_at >= newest - timedelta(seconds=window_s))
        ).all()
        bad: list[tuple[int, int, int]] = []
        for iid, sid, size, relpath, sha, sop in rows:
            try:
                ok = hashlib.sha256(store.spool_path(relpath).read_bytes()).hexdigest() == sha
            except (OSError, StorageError):
                ok = False
            if not ok:
                bad.append((iid, sid, size))
                removed.append(sop)
                audit(s, "instance.unverified_removed", outcome="warning",
                      sop_instance_uid=sop, instance_id=iid,
                      reason="file missing or not what was recorded after an unclean stop")
                with contextlib.suppress(OSError, StorageError):
                    store.spool_path(relpath).unlink(missing_ok=True)
        _remove_rows(s, bad)
    if removed:
        log.warning("removed rows of unacknowledged instances whose files were incomplete",
                    extra={"count": len(removed)})
    return removed
