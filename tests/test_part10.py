"""storage.part10: the receive path's own header scan and encoders, checked against pydicom
and pynetdicom on real series and on the awkward cases the scan must hand back."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dsutils import encode_file_meta as pynetdicom_file_meta

from storage.errors import InputError
from storage.ingest import header as ingest
from storage.part10 import encode_file_meta, scan, store_response_command
from tests.support.data import list_series_dirs

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _both(part10: bytes) -> tuple[object, object]:
    """(header via the scan, header via pydicom); exceptions compared by type and text."""
    def run(values_of: object) -> object:
        try:
            return ingest._header(values_of())  # type: ignore[operator]
        except InputError as exc:
            return f"InputError: {exc}"

    fast = scan(part10, ingest._HEADER_TAGS)
    return (run(lambda: fast) if fast is not None else None,
            run(lambda: ingest._pydicom_values(part10)))


def test_scan_agrees_with_pydicom_on_every_real_file() -> None:
    files = [p for d in list_series_dirs() for p in sorted(d.rglob("*")) if p.is_file()]
    assert len(files) > 100
    scanned = 0
    for path in files:
        fast, slow = _both(path.read_bytes())
        if fast is not None:
            scanned += 1
            assert fast == slow, path
    # The real series are plain little-endian files: the scan must handle them itself.
    assert scanned == len(files)


def _dataset(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "ID-1"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 12
    ds.SliceThickness = "1.25"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = 512
    ds.Columns = 512
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_scan_skips_nested_sequences_of_undefined_length(syntax: str) -> None:
    inner = Dataset()
    inner.CodeValue = "X"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds = _dataset(ReferencedImageSequence=Sequence([item, Dataset()]))
    # Undefined lengths everywhere (pydicom writes defined ones unless told).
    ds["ReferencedImageSequence"].is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it.is_undefined_length_sequence_item = True
    item["ConceptNameCodeSequence"].is_undefined_length = True
    raw = _part10(ds, syntax)
    assert b"\xfe\xff\xdd\xe0" in raw  # a sequence delimiter really is in the bytes
    fast, slow = _both(raw)
    assert fast is not None and fast == slow
    values = scan(raw, ingest._HEADER_TAGS)
    assert values is not None
    assert values["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert values["SliceThickness"] == 1.25 and values["Rows"] == 512
    assert values["InstanceNumber"] == 12


@pytest.mark.parametrize("why,ds,syntax", [
    ("non-ASCII name", _dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jörg"),
     ExplicitVRLittleEndian),
    ("ISO 2022 escapes", _dataset(SpecificCharacterSet=["", "ISO 2022 IR 87"]),
     ExplicitVRLittleEndian),
    ("deflated", _dataset(), DeflatedExplicitVRLittleEndian),
    ("big endian", _dataset(), ExplicitVRBigEndian),
    ("padding inside a value", _dataset(ImageType=["ORIGINAL ", "PRIMARY"]),
     ExplicitVRLittleEndian),
])
def test_scan_hands_odd_datasets_to_pydicom(why: str, ds: Dataset, syntax: str) -> None:
    raw = _part10(ds, syntax)
    assert scan(raw, ingest._HEADER_TAGS) is None, why
    header = ingest.read_header(raw)  # the careful path still reads it
    assert header.sop_instance_uid == "1.2.3.4.5"
    if why == "non-ASCII name":
        assert header.patient_name == "Müller^Jörg"


def test_scan_hands_truncated_and_foreign_bytes_to_pydicom() -> None:
    raw = _part10(_dataset())
    assert scan(raw[:200], ingest._HEADER_TAGS) is None
    assert scan(b"not dicom at all" * 20, ingest._HEADER_TAGS) is None
    with pytest.raises(InputError):
        ingest.read_header(b"not dicom at all" * 20)


def test_missing_uid_is_refused_the_same_way_by_both_paths() -> None:
    ds = _dataset()
    ds.SeriesInstanceUID = ""
    fast, slow = _both(_part10(ds))
    assert fast == slow == "InputError: missing SeriesInstanceUID"


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])  # odd and even lengths
def test_file_meta_bytes_are_pynetdicoms(sop_uid: str) -> None:
    ours = encode_file_meta(CT_IMAGE, sop_uid, ExplicitVRLittleEndian,
                            pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
                            pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION)
    theirs = b"\0" * 128 + b"DICM" + pynetdicom_file_meta(create_file_meta(
        sop_class_uid=CT_IMAGE, sop_instance_uid=sop_uid,
        transfer_syntax=ExplicitVRLittleEndian))
    assert ours == theirs
    meta = pydicom.dcmread(BytesIO(ours)).file_meta
    assert meta.MediaStorageSOPInstanceUID == sop_uid
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])
@pytest.mark.parametrize("status", [0x0000, 0xB000])
def test_store_response_bytes_are_pynetdicoms(sop_uid: str, status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT_IMAGE
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 16384))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1
    assert pdv == b"\x03" + store_response_command(CT_IMAGE, sop_uid, 7, status)


def test_real_series_dirs_exist() -> None:
    assert all(isinstance(d, Path) and d.is_dir() for d in list_series_dirs())
