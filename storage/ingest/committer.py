"""The commit thread: the rows of every association of a process share transactions.

Why a thread of its own: the commit's fsync is the largest cost of a store
after the file's own; rows that queue while one commit runs share the next
one (group commit), and each sender still waits for its own row.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.db import Database
from storage.errors import StorageError
from storage.filestore import StoredFile
from storage.ingest.header import InstanceHeader
from storage.ingest.statements import receive_statements
from storage.models import SeriesState, utcnow

__all__ = ["GroupCommitter", "Peer", "Recorded", "Row"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent the instance; goes to the audit row, never to a log line."""

    ae_title: str | None = None
    host: str | None = None


_RECEIVING = SeriesState.RECEIVING.value


@dataclass(frozen=True, slots=True)
class Row:
    """What one received instance adds to the database."""

    header: InstanceHeader
    stored: StoredFile
    transfer_syntax_uid: str
    peer: Peer


@dataclass(frozen=True, slots=True)
class Recorded:
    instance_id: int
    series_id: int
    reopened: bool


_STOP = object()


class _AlreadyRecordedError(Exception):
    """Internal: the instance row exists; the row's savepoint is rolled back."""


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


class GroupCommitter:
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
        self._stmts = receive_statements(db.engine.dialect)
        self._sqlite = db.engine.dialect.name == "sqlite"
        database = db.engine.url.database if self._sqlite else None
        on_disk = database not in (None, "", ":memory:") and not str(database).startswith("file:")
        self._turn = _WriterTurn(Path(f"{database}-ingest.lock")) if on_disk else None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: Any = None  # the commit thread's own, opened by its first batch

    def submit(self, row: Row) -> Future[Recorded | None]:
        """Queue ``row``; the future resolves once it is committed (None: already recorded)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ingest-commit",
                                                daemon=True)
                self._thread.start()
        done: Future[Recorded | None] = Future()
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

    def _commit(self, batch: list[tuple[Row, Future[Recorded | None]]]) -> None:
        results: list[Recorded | BaseException | None] = []
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

    def _insert(self, cur: Any, row: Row) -> Recorded | None:
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
        return Recorded(int(inserted[0]), int(series_id), reopened)
