"""The shared real scanner data (../shared/data), used in place and never copied into git."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

__all__ = ["SHARED_DATA", "dicom_series_dir", "list_series_dirs", "repaired_siemens",
           "sr_texts"]

SHARED_DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
DICOM = SHARED_DATA / "dicom"


def dicom_series_dir(name: str) -> Path:
    """Folder of one shared series; fails loudly if the shared data is missing."""
    path = DICOM / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared test data {path} is missing: the project expects ../shared/data beside "
            "the checkout (see the README)"
        )
    return path


def list_series_dirs() -> list[Path]:
    return sorted(p for p in DICOM.iterdir() if p.is_dir())


def repaired_siemens(tmp: Path) -> Path:
    """A copy of ct_abdomen_siemens with UIDs storescu accepts (README: the UID quirk)."""
    out = tmp / "ct_abdomen_siemens_repaired"
    out.mkdir(exist_ok=True)
    study = generate_uid(entropy_srcs=["ainode-test", "ct_abdomen_siemens", "study"])
    series = generate_uid(entropy_srcs=["ainode-test", "ct_abdomen_siemens", "series"])
    for f in sorted(dicom_series_dir("ct_abdomen_siemens").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.save_as(out / f.name, enforce_file_format=True)
    return out


def sr_texts(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT value in an SR content tree, depth first."""
    found: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            found.append(str(item.TextValue))
        found.extend(sr_texts(item))
    return found
