"""Ingest policy: what one received instance becomes (stored, a repeat, a conflict, refused).

Why apart from the commit thread and the SQL: this is the decision of *what*
to persist, in the order that makes an acknowledgement safe (see the
package's docstring); the committer only makes rows durable.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from storage.audit import audit
from storage.db import Database
from storage.errors import ConflictError, InputError, OutOfSpaceError, StorageError
from storage.filestore import FileStore, StoredFile, valid_uid, write_error
from storage.ingest.committer import GroupCommitter, Peer, Recorded, Row
from storage.ingest.header import InstanceHeader, read_checked_header
from storage.ingest.recovery import remove_rows
from storage.models import Instance

__all__ = ["IngestOutcome", "IngestResult", "Ingestor"]

log = logging.getLogger(__name__)


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes already stored: acknowledged, stored once


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: IngestOutcome
    instance_id: int
    series_id: int
    relpath: str
    reopened: bool = False


class Ingestor:
    """Records received instances; shared by every association thread of one process."""

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store
        self._committer = GroupCommitter(db)

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

        Raises OutOfSpaceError (nothing written), InputError (nothing written; also
        native Pixel Data whose length disagrees with its geometry),
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
            header = read_checked_header(part10, transfer_syntax_uid)
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
        except OutOfSpaceError as exc:  # the file system filled during the write
            self._audit_refusal("instance.rejected", peer, "disk_full", str(exc),
                                sop_instance_uid=header.sop_instance_uid)
            raise
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
        pending = self._committer.submit(Row(header, stored, transfer_syntax_uid, peer))
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
                else:
                    stored.path.unlink(missing_ok=True)
                raise write_error("cannot make the instance durable", exc) from exc
        try:
            recorded = pending.result()
        except StorageError:
            if durable is not None:
                # Written by this store, recorded nowhere, never acknowledged (a database
                # outage): it goes now, so the spool holds no file without its row.
                stored.path.unlink(missing_ok=True)
            raise
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

    def _forget(self, recorded: Recorded, stored: StoredFile, *, reason: str) -> None:
        """Undo a committed row whose file could not be made durable (never acknowledged)."""
        try:
            with self.db.session() as s:
                remove_rows(s, [(recorded.instance_id, recorded.series_id, stored.size)])
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
