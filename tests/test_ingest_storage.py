"""Ingest policy without a network: rows, files, audit, duplicates, conflicts, assembly.

Runs on SQLite and PostgreSQL (``any_db``) with real scanner files as input.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from storage.db import Database
from storage.errors import ConflictError, InputError, OutOfSpaceError
from storage.filestore import FileStore
from storage.ingest import Ingestor, IngestOutcome, Peer, read_header
from storage.models import AuditEvent, Instance, Series, SeriesState, utcnow
from storage.series import close_stable_series, list_studies, series_of_study
from tests.support.data import dicom_series_dir

PEER = Peer("SENDER", "127.0.0.1")


def _files(name: str) -> list[Path]:
    return sorted(dicom_series_dir(name).glob("*.dcm"))


def _ts(data: bytes) -> str:
    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _events(db: Database, event: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.execute(sa.select(AuditEvent).where(AuditEvent.event == event)).scalars())


def test_series_is_stored_once_per_instance_with_rows_files_and_audit(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    files = _files("mr_head_siemens_t1sag")
    for f in files:
        data = f.read_bytes()
        result = ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
        assert result.outcome is IngestOutcome.STORED
        # stored byte for byte as received
        assert filestore.spool_path(result.relpath).read_bytes() == data
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    with any_db.session() as s:
        uids = set(s.execute(sa.select(Instance.sop_instance_uid)).scalars())
        series = s.execute(sa.select(Series)).scalar_one()
        assert series.instance_count == len(files)
        assert series.state is SeriesState.RECEIVING
        assert series.attributes["Modality"] == "MR"
        assert "PatientName" not in series.attributes
    assert uids == expected
    assert len(_events(any_db, "instance.received")) == len(files)
    assert sorted(p.name for p in filestore.spool.rglob("*.dcm")) == sorted(
        f"{u}.dcm" for u in expected
    )


def test_same_instance_twice_is_acknowledged_and_stored_once(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    data = _files("ct_phantom_philips")[0].read_bytes()
    first = ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    second = ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    assert second.outcome is IngestOutcome.DUPLICATE
    assert second.instance_id == first.instance_id
    with any_db.session() as s:
        assert s.execute(sa.select(sa.func.count(Instance.id))).scalar_one() == 1
        assert s.execute(sa.select(Series.instance_count)).scalar_one() == 1
    dup = _events(any_db, "instance.duplicate")
    assert len(dup) == 1 and dup[0].actor == "SENDER"


def test_different_dataset_under_stored_uid_is_quarantined_not_overwritten(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    path = _files("ct_phantom_philips")[0]
    original = path.read_bytes()
    stored = ingestor.ingest(original, transfer_syntax_uid=_ts(original), peer=PEER)
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "CHANGED"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    changed = buf.getvalue()
    with pytest.raises(ConflictError):
        ingestor.ingest(changed, transfer_syntax_uid=_ts(changed), peer=PEER)
    assert filestore.spool_path(stored.relpath).read_bytes() == original
    kept = list(filestore.quarantine.glob("*.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes() == changed
    conflict = _events(any_db, "instance.conflict")
    assert len(conflict) == 1
    assert conflict[0].details["sha256"] == hashlib.sha256(changed).hexdigest()


def test_orphan_file_from_a_crash_is_recorded_when_the_sender_retries(
    any_db: Database, filestore: FileStore
) -> None:
    # A node killed after the file's rename but before its commit never acknowledged.
    data = _files("ct_phantom_philips")[1].read_bytes()
    header = read_header(data)
    filestore.write_instance(header.study_uid, header.series_uid, header.sop_instance_uid, [data])
    result = Ingestor(any_db, filestore).ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    assert result.outcome is IngestOutcome.STORED
    with any_db.session() as s:
        assert s.execute(sa.select(sa.func.count(Instance.id))).scalar_one() == 1


def test_unrecorded_partial_file_is_replaced_when_the_sender_retries(
    any_db: Database, filestore: FileStore
) -> None:
    # A power cut after the file got its name but before its data was on disk: a
    # file of the wrong bytes and no row. It was never acknowledged; the retry wins.
    data = _files("ct_phantom_philips")[2].read_bytes()
    header = read_header(data)
    filestore.write_instance(header.study_uid, header.series_uid, header.sop_instance_uid,
                             [b"\0" * 4096])
    result = Ingestor(any_db, filestore).ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    assert result.outcome is IngestOutcome.STORED
    assert filestore.spool_path(result.relpath).read_bytes() == data
    assert _events(any_db, "instance.conflict") == []
    assert list(filestore.quarantine.iterdir()) == []


def test_a_store_of_the_same_instance_waits_for_the_one_in_progress(
    any_db: Database, filestore: FileStore
) -> None:
    """While a file is written and not yet recorded its flock is held: a second
    store of the same SOP instance with other bytes waits, then sees the row and
    reports a conflict, instead of taking the file for a crash leftover."""
    import threading

    first = _files("ct_phantom_philips")[3].read_bytes()
    header = read_header(first)
    changed = bytearray(first)
    changed[-1] ^= 0xFF
    ingestor = Ingestor(any_db, filestore)
    held = filestore.write_instance_held(header.study_uid, header.series_uid,
                                         header.sop_instance_uid, [first])
    outcome: list[object] = []

    def second() -> None:
        try:
            outcome.append(ingestor.ingest(bytes(changed), transfer_syntax_uid=_ts(first),
                                           peer=PEER))
        except ConflictError as exc:
            outcome.append(exc)

    t = threading.Thread(target=second)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # waiting on the lock, not deciding
    with held:  # the first store records its row, then lets go
        ingestor._record(header, held.stored, _ts(first), PEER, first)
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ConflictError)
    assert filestore.spool_path(held.stored.relpath).read_bytes() == first
    ingestor.close()


def test_unrepaired_siemens_files_with_empty_uids_are_refused_and_audited(
    sqlite_db: Database, filestore: FileStore
) -> None:
    data = _files("ct_abdomen_siemens")[0].read_bytes()
    with pytest.raises(InputError, match="missing SOPClassUID, SOPInstanceUID"):
        Ingestor(sqlite_db, filestore).ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    assert list(filestore.spool.rglob("*.dcm")) == []
    rejected = _events(sqlite_db, "instance.rejected")
    assert len(rejected) == 1 and rejected[0].details["reason"] == "bad_dataset"


def test_unparseable_bytes_are_refused(sqlite_db: Database, filestore: FileStore) -> None:
    with pytest.raises(InputError):
        Ingestor(sqlite_db, filestore).ingest(
            b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage",
            transfer_syntax_uid="1.2.840.10008.1.2.1", peer=PEER,
        )
    assert list(filestore.spool.rglob("*.dcm")) == []


def test_low_disk_refuses_before_writing(sqlite_db: Database, data_dir: Path) -> None:
    store = FileStore(data_dir, min_free_mb=10**9)  # a floor no disk reaches
    data = _files("ct_phantom_philips")[0].read_bytes()
    with pytest.raises(OutOfSpaceError):
        Ingestor(sqlite_db, store).ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    assert list(store.spool.rglob("*")) == [store.spool / ".tmp"]
    assert _events(sqlite_db, "instance.rejected")[0].details["reason"] == "low_disk"


def test_series_completes_after_stable_age_and_reopens_on_late_instance(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    files = _files("mr_head_philips_classic")
    for f in files[:-1]:
        data = f.read_bytes()
        ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    now = utcnow()
    assert close_stable_series(any_db, 10.0, now) == []  # arrived just now: not stable yet
    done = close_stable_series(any_db, 10.0, now + timedelta(seconds=11))
    assert [d.instance_count for d in done] == [len(files) - 1]
    assert close_stable_series(any_db, 10.0, now + timedelta(seconds=12)) == []  # only once
    late = files[-1].read_bytes()
    assert ingestor.ingest(late, transfer_syntax_uid=_ts(late), peer=PEER).reopened
    with any_db.session() as s:
        series = s.execute(sa.select(Series)).scalar_one()
        assert series.state is SeriesState.RECEIVING and series.reopened_count == 1
    assert len(_events(any_db, "series.reopened")) == 1
    again = close_stable_series(any_db, 10.0, utcnow() + timedelta(seconds=11))
    assert [(d.instance_count, d.reopened_count) for d in again] == [(len(files), 1)]


def test_enhanced_and_classic_share_one_series_and_study_grouping_holds(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    for name in ("mr_head_philips_enhanced", "mr_head_philips_classic", "ct_phantom_philips"):
        for f in _files(name):
            data = f.read_bytes()
            ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    enhanced = pydicom.dcmread(_files("mr_head_philips_enhanced")[0], stop_before_pixels=True)
    in_study = series_of_study(any_db, str(enhanced.StudyInstanceUID))
    assert [s.series_uid for s in in_study] == [str(enhanced.SeriesInstanceUID)]
    assert in_study[0].instance_count == 41  # 1 enhanced + 40 classic, one series UID
    studies = {s.study_uid: s for s in list_studies(any_db)}
    assert len(studies) == 2
    assert studies[str(enhanced.StudyInstanceUID)].instance_count == 41


def test_concurrent_associations_share_commits_and_each_instance_is_recorded_once(
    any_db: Database, filestore: FileStore
) -> None:
    """Group commit under a race: every instance sent twice, at once, from eight threads.

    Each store must come back STORED or DUPLICATE, exactly one STORED per SOP
    instance, and the counters, rows and audit rows must agree afterwards.
    """
    from concurrent.futures import ThreadPoolExecutor

    ingestor = Ingestor(any_db, filestore)
    datas = [f.read_bytes() for f in _files("ct_phantom_philips")]
    ts = _ts(datas[0])
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(
                lambda d: ingestor.ingest(d, transfer_syntax_uid=ts, peer=PEER),
                [d for d in datas for _ in range(2)],
            ))
    finally:
        ingestor.close()
    stored = [r for r in results if r.outcome is IngestOutcome.STORED]
    assert len(stored) == len(datas)
    assert len(results) - len(stored) == len(datas)
    with any_db.session() as s:
        series = s.execute(sa.select(Series)).scalar_one()
        n_rows = s.execute(sa.select(sa.func.count()).select_from(Instance)).scalar_one()
    assert series.instance_count == n_rows == len(datas)
    assert series.size_bytes == sum(len(d) for d in datas)
    assert len(_events(any_db, "instance.received")) == len(datas)
    assert len(_events(any_db, "instance.duplicate")) == len(datas)
    assert len(list(filestore.spool.rglob("*.dcm"))) == len(datas)


def test_two_ingestors_like_two_receiver_processes_take_turns(
    sqlite_db: Database, filestore: FileStore
) -> None:
    """Two Ingestors on one SQLite file (as two receiver processes have): their commit
    threads take turns through the lock file, and the duplicates race between them."""
    from concurrent.futures import ThreadPoolExecutor

    ingestors = [Ingestor(sqlite_db, filestore), Ingestor(sqlite_db, filestore)]
    datas = [f.read_bytes() for f in _files("ct_phantom_philips")]
    ts = _ts(datas[0])
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(
                lambda job: ingestors[job[0]].ingest(job[1], transfer_syntax_uid=ts, peer=PEER),
                [(i, d) for d in datas for i in (0, 1)],
            ))
    finally:
        for ing in ingestors:
            ing.close()
    assert sum(r.outcome is IngestOutcome.STORED for r in results) == len(datas)
    lock = Path(f"{sqlite_db.engine.url.database}-ingest.lock")
    assert lock.exists()
    with sqlite_db.session() as s:
        n_rows = s.execute(sa.select(sa.func.count()).select_from(Instance)).scalar_one()
    assert n_rows == len(datas)


def test_start_up_check_removes_rows_whose_files_did_not_survive(
    any_db: Database, filestore: FileStore
) -> None:
    """A row commits while its file's fsync is still running; after a power cut in that
    moment the file can be missing or incomplete. Those rows (never acknowledged) go."""
    from storage.ingest import verify_recent

    ingestor = Ingestor(any_db, filestore)
    files = _files("ct_phantom_philips")[:5]
    results = [ingestor.ingest(f.read_bytes(), transfer_syntax_uid=_ts(f.read_bytes()),
                               peer=PEER) for f in files]
    ingestor.close()
    filestore.spool_path(results[3].relpath).write_bytes(b"\0" * 100)  # incomplete
    filestore.spool_path(results[4].relpath).unlink()  # missing
    removed = verify_recent(any_db, filestore)
    gone = {read_header(files[3].read_bytes()).sop_instance_uid,
            read_header(files[4].read_bytes()).sop_instance_uid}
    assert set(removed) == gone
    with any_db.session() as s:
        series = s.execute(sa.select(Series)).scalar_one()
        uids = set(s.execute(sa.select(Instance.sop_instance_uid)).scalars())
    assert series.instance_count == 3 and not (uids & gone)
    assert series.size_bytes == sum(r.relpath and filestore.spool_path(r.relpath).stat().st_size
                                    for r in results[:3])
    assert len(_events(any_db, "instance.unverified_removed")) == 2
    assert verify_recent(any_db, filestore) == []  # the good ones stay


def test_failed_fsync_undoes_the_row_and_refuses_the_store(
    sqlite_db: Database, filestore: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.errors import StorageError
    from storage.filestore import HeldFile

    def broken(self: HeldFile) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(HeldFile, "sync", broken)
    data = _files("ct_phantom_philips")[0].read_bytes()
    ingestor = Ingestor(sqlite_db, filestore)
    with pytest.raises(StorageError, match="durable"):
        ingestor.ingest(data, transfer_syntax_uid=_ts(data), peer=PEER)
    ingestor.close()
    with sqlite_db.session() as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Instance)).scalar_one() == 0
        assert s.execute(sa.select(Series.instance_count)).scalar_one() == 0
    assert list(filestore.spool.rglob("*.dcm")) == []
    assert len(_events(sqlite_db, "instance.write_failed")) == 1
