"""Phantoms on disk: the MSD Task07 layout (NIfTI + cases.csv) and DICOM CT series.

The Task07 layout is what ``ainode train`` and ``ainode evaluate`` read, so a
hospital's own labelled folder and the phantoms go through the same code.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from pipelines.phantom.generator import Phantom, PhantomSpec, generate

__all__ = ["CASES_CSV_FIELDS", "phantom_to_sitk", "write_dataset", "write_dicom_series"]

CASES_CSV_FIELDS = ("case_id", "diagnosis", "lesion_diameter_mm", "location")


def phantom_to_sitk(p: Phantom) -> tuple[sitk.Image, sitk.Image]:
    img = sitk.GetImageFromArray(p.image)
    lab = sitk.GetImageFromArray(p.label)
    for im in (img, lab):
        im.SetSpacing(p.spacing)
        im.SetOrigin(p.origin)
    return img, lab


def write_dataset(
    out: Path,
    seeds: Iterable[int],
    *,
    contrast: str = "ct",
    images: str = "imagesTr",
    labels: str = "labelsTr",
    prefix: str = "phantom",
) -> list[dict[str, str]]:
    """Write one case per seed; CT as int16 HU (what scanners export), MR as float32."""
    (out / images).mkdir(parents=True, exist_ok=True)
    (out / labels).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for seed in seeds:
        p = generate(PhantomSpec(seed=seed, contrast=contrast))  # type: ignore[arg-type]
        case = f"{prefix}_{seed:05d}"
        img, lab = phantom_to_sitk(p)
        if contrast == "ct":
            img = sitk.Cast(sitk.Round(img), sitk.sitkInt16) if hasattr(sitk, "Round") else \
                sitk.Cast(img, sitk.sitkInt16)
        sitk.WriteImage(img, str(out / images / f"{case}_0000.nii.gz"))
        sitk.WriteImage(lab, str(out / labels / f"{case}.nii.gz"))
        rows.append({
            "case_id": case,
            "diagnosis": p.diagnosis,
            "lesion_diameter_mm": "" if p.lesion_diameter_mm is None
            else f"{p.lesion_diameter_mm:.1f}",
            "location": p.lesion_location or "",
        })
    merge_cases_csv(out / "cases.csv", rows, CASES_CSV_FIELDS)
    return rows


def merge_cases_csv(csv_path: Path, rows: Sequence[Mapping[str, str]],
                    fields: Sequence[str]) -> None:
    """Add or replace ``rows`` (by case id) in a dataset's ``cases.csv``, sorted by case.

    A dataset is written in batches (``make train-demo`` resumes after an
    interruption), so a later batch must keep the rows of the earlier ones.
    """
    existing: dict[str, Mapping[str, str]] = {}
    if csv_path.exists():
        with csv_path.open(newline="") as fh:
            existing = {r["case_id"]: r for r in csv.DictReader(fh)}
    for r in rows:
        existing[r["case_id"]] = r
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        for cid in sorted(existing):
            w.writerow({k: existing[cid].get(k, "") for k in fields})


def write_dicom_series(p: Phantom, out: Path, *, seed: int = 0) -> list[Path]:
    """A CT phantom as a classic single-frame CT series with consistent UIDs and geometry.

    Slices are written feet-to-head with ImagePositionPatient from the phantom
    origin; UIDs derive from the seed so the same phantom has the same UIDs.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    key = f"ainode-phantom-{seed}"
    study = generate_uid(entropy_srcs=[key, "study"])
    series = generate_uid(entropy_srcs=[key, "series"])
    frame = generate_uid(entropy_srcs=[key, "for"])
    now = dt.datetime(2024, 1, 1, 12, 0, 0)
    arr = np.clip(np.round(p.image), -1024, 3071).astype(np.int16)
    paths: list[Path] = []
    for k in range(arr.shape[0]):
        sop = generate_uid(entropy_srcs=[key, "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientName = f"Phantom^{seed}"
        ds.PatientID = f"PHANTOM{seed:05d}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.Manufacturer = "dicom-ai-node phantom"
        ds.SeriesDescription = f"Synthetic phantom ({p.diagnosis})"
        # ORIGINAL\PRIMARY: it stands in for an acquired axial CT; routing skips DERIVED
        # images (storage.image_kind), so a derived phantom would never reach a pipeline.
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = p.origin[2] + k * p.spacing[2]
        ds.ImagePositionPatient = [f"{p.origin[0]:.4f}", f"{p.origin[1]:.4f}", f"{z:.4f}"]
        ds.SliceThickness = f"{p.spacing[2]:.4f}"
        ds.PixelSpacing = [f"{p.spacing[1]:.6f}", f"{p.spacing[0]:.6f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = arr[k].tobytes()
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def spec_for(seed: int, contrast: str = "ct") -> PhantomSpec:
    return PhantomSpec(seed=seed, contrast=contrast)  # type: ignore[arg-type]
