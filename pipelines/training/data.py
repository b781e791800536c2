"""Reading a labelled folder (MSD Task07 layout) into the arrays each stage trains on.

Layout: ``imagesTr/<case>_0000.nii.gz`` (or ``.mha``/``.nii``), ``labelsTr/<case>.*``
(0 background, 1 pancreas, 2 tumour), optional ``cases.csv`` with ``case_id,diagnosis``.
``imagesTs``/``labelsTs`` are read the same way for evaluation.

Every sample is made by ``pipelines.preprocess.ModelInput``, the same call that
makes a job's model inputs, so a model trains on exactly what it will be run on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from pipelines.pancreas.output import TUMOUR_TYPES
from pipelines.pancreas.preprocess import slice_roi, stage2_roi
from pipelines.preprocess import ModelInput, stack_25d
from storage.errors import InputError

__all__ = ["Case", "find_cases", "read_case", "slice_samples", "stage1_sample", "stage2_sample"]

_EXTS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass(frozen=True, slots=True)
class Case:
    case_id: str
    image: Path
    label: Path | None
    diagnosis: str | None  # one of TUMOUR_TYPES, or None when no cases.csv row


def _stem(p: Path) -> str:
    name = p.name
    for ext in _EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return p.stem


def find_cases(data: Path, split: str | None = None) -> list[Case]:
    """The cases of ``data``: ``imagesTs`` when present (evaluation) unless ``split`` says."""
    splits = [split] if split else (["Ts", "Tr"] if (data / "imagesTs").is_dir() else ["Tr"])
    for sp in splits:
        img_dir, lab_dir = data / f"images{sp}", data / f"labels{sp}"
        if img_dir.is_dir():
            break
    else:
        raise InputError(f"{data}: no imagesTr/ or imagesTs/ folder (MSD layout expected)")
    diag: dict[str, str] = {}
    csv_path = data / "cases.csv"
    if csv_path.exists():
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                d = (row.get("diagnosis") or "").strip()
                if d and d not in TUMOUR_TYPES:
                    raise InputError(f"{csv_path}: unknown diagnosis {d!r} for {row['case_id']}")
                diag[row["case_id"]] = d
    cases = []
    for img in sorted(p for p in img_dir.iterdir() if p.name.endswith(_EXTS)):
        stem = _stem(img)
        cid = stem[:-5] if stem.endswith("_0000") else stem
        lab = next((lab_dir / f"{cid}{e}" for e in _EXTS if (lab_dir / f"{cid}{e}").exists()),
                   None)
        cases.append(Case(cid, img, lab, diag.get(cid) or None))
    if not cases:
        raise InputError(f"{img_dir}: no images")
    return cases


def read_case(case: Case) -> tuple[sitk.Image, sitk.Image]:
    try:
        img = sitk.ReadImage(str(case.image), sitk.sitkFloat32)
        if case.label is None:
            raise InputError(f"{case.case_id}: no label file")
        lab = sitk.ReadImage(str(case.label), sitk.sitkUInt8)
    except RuntimeError as exc:
        raise InputError(f"{case.case_id}: unreadable image or label: {exc}") from exc
    if img.GetSize() != lab.GetSize():
        raise InputError(f"{case.case_id}: image and label sizes differ")
    lab.CopyInformation(img)
    return img, lab


def stage1_sample(img: sitk.Image, lab: sitk.Image, spacing: tuple[float, float, float],
                  preset: str, orientation: str | None = None,
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Whole volume at the stage-1 spacing; target = pancreas including its lesion."""
    prepared = ModelInput(preset, spacing, orientation=orientation).forward(img)
    return prepared.array(), (prepared.label(lab) > 0).astype(np.uint8)


def _oriented(img: sitk.Image, lab: sitk.Image,
              orientation: str | None) -> tuple[sitk.Image, sitk.Image]:
    """Both in ``orientation`` (lossless), so a ROI drawn on the label has the axes of
    the stage-1 grid a job's ROI is drawn on."""
    if orientation is None:
        return img, lab
    return sitk.DICOMOrient(img, orientation), sitk.DICOMOrient(lab, orientation)


def stage2_sample(
    img: sitk.Image, lab: sitk.Image, spacing: tuple[float, float, float],
    patch_zyx: tuple[int, int, int], preset: str, margin_mm: float = 20.0,
    min_extra: int = 8, orientation: str | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """The pancreas ROI: the ground-truth box plus a wide margin for crop jitter, at
    least ``min_extra`` voxels more than a patch. ``margin_mm=10, min_extra=0`` is the
    grid the pipeline gives stage 2 when stage 1 finds the gland exactly.
    ``orientation``: the ROI's axes, as the pipeline's stage-1 grid has them."""
    img, lab = _oriented(img, lab, orientation)
    mask = sitk.GetArrayFromImage(lab) > 0
    ref = stage2_roi(mask, lab, margin_mm=margin_mm, spacing=spacing, patch_zyx=patch_zyx,
                     min_extra=min_extra)
    prepared = ModelInput(preset, spacing).forward(img, onto=ref)
    return prepared.array(), (prepared.label(lab) == 2).astype(np.uint8)


def slice_samples(
    img: sitk.Image, lab: sitk.Image, diagnosis: str, spacing: tuple[float, float, float],
    size: int, preset: str, margin_mm: float = 10.0, min_lesion_px: int = 4,
    orientation: str | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """2.5D slices of the ROI (3 adjacent slices as channels), each labelled with the
    case's tumour type when it shows lesion, otherwise normal."""
    img, lab = _oriented(img, lab, orientation)
    mask = sitk.GetArrayFromImage(lab) > 0
    ref = slice_roi(mask, lab, margin_mm=margin_mm, spacing=spacing, size=size)
    prepared = ModelInput(preset, spacing).forward(img, onto=ref)
    y = prepared.label(lab)
    stack = stack_25d(prepared.array())
    cls = TUMOUR_TYPES.index(diagnosis) if diagnosis in TUMOUR_TYPES else 0
    labels = np.where((y == 2).sum(axis=(1, 2)) >= min_lesion_px, cls, 0).astype(np.int64)
    return stack, labels
