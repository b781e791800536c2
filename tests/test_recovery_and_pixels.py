"""Start-up sweep of unrecorded spool files, and the native Pixel Data length check.

In-process, on SQLite and PostgreSQL (``any_db``), with the shared scanner files.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from storage.db import Database
from storage.errors import InputError
from storage.filestore import FileStore
from storage.ingest import Ingestor, Peer, read_header, sweep_unrecorded
from storage.ingest.header import read_checked_header
from storage.ingest.pixels import GEOMETRY_KEYWORDS, check_native_pixel_length
from storage.models import AuditEvent, Instance
from tests.support.data import dicom_series_dir, list_series_dirs

PEER = Peer("SENDER", "127.0.0.1")
_EXPLICIT = "1.2.840.10008.1.2.1"


def _ct_files() -> list[Path]:
    return sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))  # native CT


def _events(db: Database, event: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(sa.select(AuditEvent).where(AuditEvent.event == event)))


def test_start_up_sweep_removes_and_audits_spool_files_without_a_row(
    any_db: Database, filestore: FileStore
) -> None:
    """A SIGKILL between the file's link into the spool and its row's commit leaves a
    complete file no row records (never acknowledged): the sweep removes it, audits
    it, and leaves every recorded file alone."""
    files = _ct_files()[:4]
    ingestor = Ingestor(any_db, filestore)
    try:
        kept = [ingestor.ingest(f.read_bytes(), transfer_syntax_uid=_EXPLICIT, peer=PEER)
                for f in files[:3]]
    finally:
        ingestor.close()
    # What the killed store left: the file, linked and complete, and no row.
    h = read_header(files[3].read_bytes())
    orphan = filestore.write_instance(h.study_uid, h.series_uid, h.sop_instance_uid,
                                      [files[3].read_bytes()])
    removed = sweep_unrecorded(any_db, filestore)
    assert removed == [orphan.relpath]
    assert not orphan.path.exists()
    assert all(filestore.spool_path(r.relpath).is_file() for r in kept)
    (row,) = _events(any_db, "instance.unrecorded_removed")
    assert row.sop_instance_uid == h.sop_instance_uid and row.outcome == "warning"
    assert sweep_unrecorded(any_db, filestore) == []
    spool = {p.relative_to(filestore.spool).as_posix() for p in filestore.spool.rglob("*.dcm")
             if not p.name.startswith(".")}
    with any_db.session() as s:
        assert spool == set(s.scalars(sa.select(Instance.path)))


def _half_slice(path: Path) -> bytes:
    """The issue's case: a CT slice whose Pixel Data element holds half its pixels."""
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:258316]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_every_shared_file_passes_the_pixel_length_check() -> None:
    """No real scanner file is refused: the fast header path and pydicom agree on them."""
    checked = 0
    for d in list_series_dirs():
        for f in sorted(d.glob("*")):
            header = pydicom.dcmread(f, stop_before_pixels=True)
            values = {kw: header.get(kw) for kw in GEOMETRY_KEYWORDS}
            check_native_pixel_length(f.read_bytes(), str(header.file_meta.TransferSyntaxUID),
                                      values)
            checked += 1
    assert checked > 400


@pytest.mark.parametrize("cut", ["declared_short", "stream_cut", "longer", "no_bits_allocated"])
def test_native_pixel_data_not_matching_its_geometry_is_refused(cut: str) -> None:
    src = _ct_files()[0]
    data = src.read_bytes()
    if cut == "declared_short":
        data = _half_slice(src)
    elif cut == "stream_cut":
        data = data[: len(data) - 262144]  # the declared length stays; the bytes stop
    elif cut == "longer":
        ds = pydicom.dcmread(src)
        ds.PixelData = ds.PixelData + b"\0\0\0\0"
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
    else:
        ds = pydicom.dcmread(src)
        del ds.BitsAllocated
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
    with pytest.raises(InputError, match="Pixel Data"):
        read_checked_header(data, _EXPLICIT)


def test_a_half_slice_is_refused_audited_and_nothing_written(
    any_db: Database, filestore: FileStore
) -> None:
    ingestor = Ingestor(any_db, filestore)
    try:
        with pytest.raises(InputError, match="258316 bytes, its geometry needs 524288"):
            ingestor.ingest(_half_slice(_ct_files()[0]), transfer_syntax_uid=_EXPLICIT,
                            peer=PEER)
    finally:
        ingestor.close()
    assert not [p for p in filestore.spool.rglob("*") if p.is_file()]
    (row,) = _events(any_db, "instance.rejected")
    assert row.details["reason"] == "bad_dataset" and "Pixel Data" in row.details["error"]
    with any_db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 0


def test_render_of_a_series_with_undecodable_pixels_is_a_one_line_refusal(
    sqlite_db: Database, filestore: FileStore, tmp_path: Path
) -> None:
    """A half slice stored before the receiver checked lengths (an older node): `ainode
    render` says which series and why (InputError, exit 2), not a traceback."""
    from node.render import render_series
    from storage.ingest.committer import GroupCommitter, Row

    data = _half_slice(_ct_files()[0])
    h = read_header(data)
    stored = filestore.write_instance(h.study_uid, h.series_uid, h.sop_instance_uid, [data])
    committer = GroupCommitter(sqlite_db)
    try:
        committer.submit(Row(h, stored, _EXPLICIT, PEER)).result(timeout=30)
    finally:
        committer.close()
    with pytest.raises(InputError,
                       match=r"cannot render series [0-9.]+: cannot decode the pixels of "):
        render_series(sqlite_db, filestore, h.series_uid, tmp_path / "png")
