"""Series to volume: the one place where DICOM geometry becomes a 3D image.

A lesion drawn on the wrong slice is the worst mistake this node can make, so
the volume is built from positions, never from instance numbers or file names,
and anything that cannot become *one* regular, unsheared grid is refused with
a reason an administrator can act on (the job runner records the
:class:`~storage.errors.GeometryError` text on the job).

Conventions (the same as SimpleITK, so ``Volume.to_sitk`` is a plain copy):

* ``array`` is ``(slices, rows, cols)``; axis 0 follows increasing position
  along the slice normal ``row x col`` (what ITK/GDCM ordering gives).
* ``spacing``/``origin`` are ``(x=col, y=row, z=slice)`` in LPS millimetres;
  ``origin`` is the centre of voxel ``[0, 0, 0]`` (the first slice's IPP).
* ``direction`` is row-major 3x3: columns are the row cosine, the column
  cosine and the slice normal.
* ``sop_instance_uids[k]`` (and ``frame_numbers[k]`` for multi-frame sources)
  name the source object of slice ``k``: masks on this grid go straight to a
  DICOM SEG without resampling.

Pixel values are the modality values after Rescale Slope/Intercept (HU for
CT), applied per slice (or per frame) because they may differ between slices.
Philips' private scale slope (2005,100E) is deliberately ignored: the standard
rescale is what PACS displays and what SimpleITK reads, so models see the
same numbers a reader sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from storage.errors import GeometryError, InputError
from storage.image_kind import is_localizer_type

__all__ = [
    "GEOMETRY_TOLERANCE_MM",
    "Volume",
    "load_datasets",
    "load_series",
]

log = logging.getLogger(__name__)

# Two positions closer than this along the normal are "the same slice".
GEOMETRY_TOLERANCE_MM = 1e-3
# Orientation cosines may differ by rounding between slices (DS strings), not more.
_ORIENTATION_TOLERANCE = 1e-4
# Pixel spacing / rows / cols must agree to this (mm).
_SPACING_TOLERANCE_MM = 1e-4
# A gap larger than this times the median spacing means slices are missing.
_GAP_FACTOR = 1.5
# Any other deviation from uniform spacing beyond this fraction is refused too:
# a uniform grid would put those slices at the wrong place.
_IRREGULAR_FRACTION = 0.2
# Steps that agree to this (mm) are one spacing when telling mixed spacings apart.
_MIXED_STEP_MM = 0.05
# Total in-plane drift of the stack allowed, as a fraction of the pixel spacing.
_SHEAR_FRACTION = 0.1



@dataclass(frozen=True, eq=False)
class Volume:
    """A series as one regular 3D grid, with the source object of every slice.

    ``eq=False``: comparing arrays element-wise in ``==`` would raise, and two
    volumes are compared by the tests field by field anyway.
    """

    array: npt.NDArray[np.float32]  # (slices, rows, cols), modality units (HU for CT)
    spacing: tuple[float, float, float]  # (x=col, y=row, z=slice) mm
    origin: tuple[float, float, float]  # LPS mm of voxel [0, 0, 0]
    direction: tuple[float, ...]  # 9 values, row-major, SimpleITK convention
    sop_instance_uids: list[str]  # per slice (axis 0)
    frame_numbers: list[int] | None  # per slice for multi-frame sources (1-based)
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    # What the series says it shows, from the first header: the applicability check of
    # a pipeline (pancreas: "is this an abdomen?") reads these before any model runs.
    # Empty when absent; a hospital may leave them empty, so they only ever *refuse*
    # (BRAIN for an abdominal model), never prove a series fit.
    body_part: str = ""  # BodyPartExamined, upper case
    anatomic_region: str = ""  # AnatomicRegionSequence[0] code meaning, upper case
    image_type: tuple[str, ...] = ()  # ImageType values, upper case

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK copy with the same geometry (the array is copied, not shared)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array, dtype=np.float32))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, like: Volume) -> Volume:
        """Wrap an image that lies on ``like``'s grid (e.g. a filtered copy).

        Refuses an image on any other grid: its slices would no longer be the
        source slices named by ``like.sop_instance_uids``. Resample back with
        the preprocessing inverse first.
        """
        size = tuple(reversed(image.GetSize()))
        if size != like.shape:
            raise GeometryError(f"image size {size} is not the source grid {like.shape}")
        for name, got, want, tol in (
            ("spacing", image.GetSpacing(), like.spacing, 1e-4),
            ("origin", image.GetOrigin(), like.origin, 1e-3),
            ("direction", image.GetDirection(), like.direction, 1e-6),
        ):
            if not np.allclose(got, want, rtol=0.0, atol=tol):
                raise GeometryError(f"image {name} {got} is not the source grid's {want}")
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        return cls(
            array=array,
            spacing=like.spacing,
            origin=like.origin,
            direction=like.direction,
            sop_instance_uids=list(like.sop_instance_uids),
            frame_numbers=None if like.frame_numbers is None else list(like.frame_numbers),
            modality=like.modality,
            series_instance_uid=like.series_instance_uid,
            study_instance_uid=like.study_instance_uid,
            frame_of_reference_uid=like.frame_of_reference_uid,
            body_part=like.body_part,
            anatomic_region=like.anatomic_region,
            image_type=like.image_type,
        )


@dataclass(frozen=True)
class _Slice:
    """Geometry and identity of one 2D image: a single-frame file or one frame."""

    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file
    sop_instance_uid: str
    series_instance_uid: str
    position: npt.NDArray[np.float64]  # IPP, LPS mm
    orientation: npt.NDArray[np.float64]  # IOP, 6 cosines
    pixel_spacing: tuple[float, float]  # (row spacing, col spacing) as in DICOM
    rows: int
    cols: int
    slope: float
    intercept: float
    localizer: bool
    instance_number: int | None = None

    def name(self) -> str:
        """How a refusal names this image: instance number (as a PACS lists it) and UID."""
        frame = "" if self.frame is None else f" frame {self.frame + 1}"
        number = "" if self.instance_number is None else f"#{self.instance_number} "
        return f"{number}{self.sop_instance_uid}{frame}"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _floats(value: Any, n: int, what: str, where: str) -> npt.NDArray[np.float64]:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{where}: unreadable {what} {value!r}") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise GeometryError(f"{where}: {what} must be {n} finite numbers, got {value!r}")
    return out


def _sop_instance_uid(ds: Dataset) -> str:
    """The instance UID, from the file meta when the dataset's is empty (de-identified data)."""
    uid = _text(ds, "SOPInstanceUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = _text(ds.file_meta, "MediaStorageSOPInstanceUID")
    return uid


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """One functional group item for ``frame``: per-frame first, then shared."""
    for owner in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(owner)
        if not groups:
            continue
        item = groups[frame] if owner.startswith("PerFrame") else groups[0]
        seq = item.get(sequence)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    return None


def _slices_of(path: Path, ds: Dataset) -> list[_Slice]:
    where = path.name
    sop = _sop_instance_uid(ds)
    if not sop:
        raise InputError(f"{where}: no SOP Instance UID in the dataset or the file meta")
    series = _text(ds, "SeriesInstanceUID")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise GeometryError(f"{where}: not an image (Rows/Columns missing)")
    localizer = is_localizer_type(ds.get("ImageType"))
    number = _instance_number(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for i in range(n_frames):
            pos = _group(ds, i, "PlanePositionSequence")
            ori = _group(ds, i, "PlaneOrientationSequence")
            meas = _group(ds, i, "PixelMeasuresSequence")
            pvt = _group(ds, i, "PixelValueTransformationSequence")
            frame_type = _group(ds, i, "MRImageFrameTypeSequence") or _group(
                ds, i, "CTImageFrameTypeSequence"
            )
            if pos is None or ori is None or meas is None:
                raise GeometryError(
                    f"{where} frame {i + 1}: no plane position/orientation/pixel measures"
                )
            frame_localizer = localizer
            if frame_type is not None and "FrameType" in frame_type:
                frame_localizer = frame_localizer or is_localizer_type(frame_type.FrameType)
            spacing = _floats(meas.get("PixelSpacing"), 2, "PixelSpacing", where)
            out.append(
                _Slice(
                    path=path,
                    frame=i,
                    sop_instance_uid=sop,
                    series_instance_uid=series,
                    position=_floats(pos.get("ImagePositionPatient"), 3, "IPP", where),
                    orientation=_floats(ori.get("ImageOrientationPatient"), 6, "IOP", where),
                    pixel_spacing=(float(spacing[0]), float(spacing[1])),
                    rows=rows,
                    cols=cols,
                    slope=float(pvt.get("RescaleSlope", 1.0) if pvt is not None else 1.0),
                    intercept=float(pvt.get("RescaleIntercept", 0.0) if pvt is not None else 0.0),
                    localizer=frame_localizer,
                    instance_number=number,
                )
            )
        return out
    if n_frames != 1:
        raise GeometryError(f"{where}: {n_frames} frames without per-frame functional groups")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise GeometryError(f"{where}: no Image Position/Orientation (Patient)")
    spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
    return [
        _Slice(
            path=path,
            frame=None,
            sop_instance_uid=sop,
            series_instance_uid=series,
            position=_floats(ds.ImagePositionPatient, 3, "IPP", where),
            orientation=_floats(ds.ImageOrientationPatient, 6, "IOP", where),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            rows=rows,
            cols=cols,
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            localizer=localizer,
            instance_number=number,
        )
    ]


def _anatomic_region(ds: Dataset) -> str:
    """The first Anatomic Region Sequence item's code meaning (upper case), or empty."""
    try:
        items = ds.get("AnatomicRegionSequence") or []
        return str(items[0].get("CodeMeaning", "") or "").strip().upper() if items else ""
    except (AttributeError, IndexError, TypeError):
        return ""


def _image_type(ds: Dataset) -> tuple[str, ...]:
    """ImageType as upper-case values (one string when the header holds a single value)."""
    value = ds.get("ImageType")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) or not isinstance(value, Sequence) else value
    return tuple(str(v).strip().upper() for v in values)


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _axes(
    orientation: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row cosine, column cosine and slice normal, orthonormalised as ITK's GDCMImageIO does.

    IOP strings are rounded, so they are not exactly orthonormal; following ITK's
    arithmetic makes the direction agree bit for bit with ITK-based readers.
    """
    row_cos, col_cos = orientation[:3], orientation[3:]
    if not (
        abs(np.linalg.norm(row_cos) - 1) < 1e-3
        and abs(np.linalg.norm(col_cos) - 1) < 1e-3
        and abs(float(row_cos @ col_cos)) < 1e-3
    ):
        raise GeometryError(f"image orientation {orientation.tolist()} is not orthonormal")
    col_cos = col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos / np.linalg.norm(row_cos), col_cos)
    normal = normal / np.linalg.norm(normal)
    row_cos = np.cross(col_cos, normal)
    return row_cos / np.linalg.norm(row_cos), col_cos, normal


@dataclass(frozen=True)
class _Layout:
    """The validated, sorted stack: what ``load_series`` turns into pixels."""

    slices: list[_Slice]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    first: Dataset


def _layout(paths: Sequence[Path], min_slices: int) -> _Layout:
    """Read headers, check the stack is one regular grid, and sort it along the normal.

    Every refusal happens here, before any pixel is decoded, so a bad series
    costs only its headers.
    """
    if not paths:
        raise GeometryError("no instances: the series is empty")
    headers = [(Path(p), _read_header(Path(p))) for p in paths]
    slices: list[_Slice] = []
    for path, ds in headers:
        slices.extend(_slices_of(path, ds))

    series_uids = {s.series_instance_uid for s in slices}
    if len(series_uids) > 1:
        raise GeometryError(
            f"instances from {len(series_uids)} different series: "
            + ", ".join(sorted(u or "<empty>" for u in series_uids))
        )

    localizers = [s for s in slices if s.localizer]
    if localizers and len(localizers) < len(slices):
        raise GeometryError(
            f"localizer/scout images mixed in: {len(localizers)} of {len(slices)} images "
            f"are localizers (e.g. {localizers[0].sop_instance_uid})"
        )
    if localizers:
        raise GeometryError("the series holds only localizer/scout images")

    ref = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - ref.orientation)) > _ORIENTATION_TOLERANCE:
            raise GeometryError(
                "mixed orientations: image orientation "
                f"{np.round(s.orientation, 4).tolist()} of {s.sop_instance_uid} differs from "
                f"{np.round(ref.orientation, 4).tolist()} of {ref.sop_instance_uid}"
            )
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise GeometryError(
                f"inconsistent rows/columns: {s.rows}x{s.cols} in {s.sop_instance_uid} "
                f"vs {ref.rows}x{ref.cols} in {ref.sop_instance_uid}"
            )
        if max(abs(a - b) for a, b in zip(s.pixel_spacing, ref.pixel_spacing, strict=True)) > (
            _SPACING_TOLERANCE_MM
        ):
            raise GeometryError(
                f"inconsistent pixel spacing: {list(s.pixel_spacing)} mm in "
                f"{s.sop_instance_uid} vs {list(ref.pixel_spacing)} mm in {ref.sop_instance_uid}"
            )

    row_cos, col_cos, normal = _axes(ref.orientation)
    along = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    if slices[0] is not ref:
        # ITK takes the direction from the first slice in sorted order; so do we, so the
        # direction agrees exactly even where IOP strings differ in their last digits.
        row_cos, col_cos, normal = _axes(slices[0].orientation)
        along = np.asarray([float(s.position @ normal) for s in slices])

    if len(slices) < max(min_slices, 1):
        raise GeometryError(
            f"too few slices: {len(slices)}, the pipeline needs at least {min_slices}"
        )

    steps = np.diff(along)
    if np.any(steps < GEOMETRY_TOLERANCE_MM):
        raise GeometryError(_duplicates_message(slices, along))

    if len(slices) > 1:
        # Every cause is named: a tilted stack with mixed spacing is both, and an admin
        # who fixes one of them only would be refused again for the other.
        problems = [*_spacing_problems(along, steps), *_tilt_problems(slices, along, normal)]
        if problems:
            raise GeometryError("; and ".join(problems))
        z_spacing = float((along[-1] - along[0]) / (len(slices) - 1))
    else:
        z_spacing = float(headers[0][1].get("SpacingBetweenSlices") or 0.0) or float(
            headers[0][1].get("SliceThickness") or 1.0
        )

    direction = (
        float(row_cos[0]), float(col_cos[0]), float(normal[0]),
        float(row_cos[1]), float(col_cos[1]), float(normal[1]),
        float(row_cos[2]), float(col_cos[2]), float(normal[2]),
    )  # fmt: skip
    # DICOM PixelSpacing is (row spacing = along a column, col spacing = along a row).
    spacing = (ref.pixel_spacing[1], ref.pixel_spacing[0], z_spacing)
    first_ds = next(ds for p, ds in headers if p == slices[0].path)
    return _Layout(slices=slices, spacing=spacing, direction=direction, first=first_ds)


def _spacing_problems(along: npt.NDArray[np.float64],
                      steps: npt.NDArray[np.float64]) -> list[str]:
    """Gaps and irregular steps along the normal, each named by where it is."""
    median = float(np.median(steps))
    worst = int(np.argmax(steps))
    irregular = np.abs(steps - median) > _IRREGULAR_FRACTION * median
    if not np.any(irregular):
        return []
    mixed = _mixed_spacing(along, steps)
    if mixed:
        return [mixed]
    if steps[worst] > _GAP_FACTOR * median:
        gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
        more = f" ({len(gaps)} such gaps)" if len(gaps) > 1 else ""
        return [
            f"missing slices: a gap of {steps[worst]:.3f} mm between slice positions "
            f"{along[worst]:.3f} and {along[worst + 1]:.3f} mm is more than "
            f"{_GAP_FACTOR}x the median spacing {median:.3f} mm{more}"
        ]
    i = int(np.argmax(np.abs(steps - median)))
    return [
        f"irregular slice spacing: {steps[i]:.3f} mm at position {along[i]:.3f} mm "
        f"vs median {median:.3f} mm"
    ]


def _mixed_spacing(along: npt.NDArray[np.float64], steps: npt.NDArray[np.float64]) -> str:
    """Two or three spacings, each kept over a run of slices: not a gap but mixed protocols.

    Such a stack (two reconstructions sent as one series, say) is not missing
    slices; saying so would send an admin looking for images that never existed.
    """
    values, counts = np.unique(np.round(steps / _MIXED_STEP_MM) * _MIXED_STEP_MM,
                               return_counts=True)
    if not 2 <= len(values) <= 3 or np.any(counts < 2):
        return ""
    runs = []
    for value in values:
        idx = np.flatnonzero(np.abs(steps - value) <= _MIXED_STEP_MM)
        if len(idx) < 2 or idx[-1] - idx[0] + 1 != len(idx):
            return ""  # scattered large steps are missing slices, not a second protocol
        runs.append(f"{value:.3f} mm over {len(idx)} steps from {along[idx[0]]:.3f} to "
                    f"{along[idx[-1] + 1]:.3f} mm")
    return f"mixed slice spacing: {', '.join(runs)}; one volume needs one spacing"


def _tilt_problems(slices: Sequence[_Slice], along: npt.NDArray[np.float64],
                   normal: npt.NDArray[np.float64]) -> list[str]:
    """Gantry tilt (or any shear): positions must move along the normal only."""
    positions = np.stack([s.position for s in slices])
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if drift <= _SHEAR_FRACTION * min(slices[0].pixel_spacing):
        return []
    total = float(along[-1] - along[0])
    angle = float(np.degrees(np.arctan2(drift, total)))
    return [
        f"gantry tilt / sheared stack: slice positions drift {drift:.3f} mm in-plane "
        f"over {total:.1f} mm (about {angle:.2f} degrees from the slice normal); "
        "refused rather than silently sheared"
    ]


def _duplicates_message(slices: Sequence[_Slice], along: npt.NDArray[np.float64]) -> str:
    """Which images share a position, by name, and what the distinct positions look like.

    An admin has to find the offending instances in PACS, so they are named; the
    cause (a repeated acquisition, a multi-phase series sent as one) is said only
    where the counts show it: every position holding the same number of images.
    """
    rounded = np.round(along, 3)
    distinct, counts = np.unique(rounded, return_counts=True)
    shared = [float(z) for z, n in zip(distinct, counts, strict=True) if n > 1]
    examples = []
    for z in shared[:2]:
        names = [s.name() for s, a in zip(slices, rounded, strict=True) if a == z]
        listed = " and ".join(names) if len(names) == 2 else f"{', '.join(names[:2])}, ..."
        examples.append(f"{len(names)} images at {z:.3f} mm ({listed})")
    more = f" (and {len(shared) - 2} more shared positions)" if len(shared) > 2 else ""
    text = (
        f"duplicate slice positions: {len(slices)} images at only {len(distinct)} distinct "
        f"positions along the normal; {'; '.join(examples)}{more}"
    )
    if len(set(counts.tolist())) == 1:
        text += (f"; every position holds {int(counts[0])} images, as a multi-phase or "
                 "repeated acquisition sent as one series does")
    elif len(distinct) > 1:
        gaps = _spacing_problems(distinct.astype(np.float64), np.diff(distinct))
        if gaps:
            text += f"; the distinct positions also have {gaps[0]}"
    return text


def _frame_pixels(path: Path, frames: list[int] | None) -> npt.NDArray[Any]:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises a wide set of decoder errors
        raise InputError(f"{path.name}: pixel data cannot be decoded ({exc})") from exc
    if frames is None:
        return pixels[np.newaxis] if pixels.ndim == 2 else pixels
    return pixels if pixels.ndim == 3 else pixels[np.newaxis]


def load_series(paths: Sequence[Path], *, min_slices: int = 1) -> Volume:
    """Build the volume of one series from its instance files.

    Raises GeometryError (with a reason fit for the job record) for anything
    that is not one regular, unsheared stack, and InputError for files that
    cannot be read or decoded.
    """
    layout = _layout(paths, min_slices)
    slices = layout.slices
    ref = slices[0]
    array = np.empty((len(slices), ref.rows, ref.cols), dtype=np.float32)
    # One decode per file: a multi-frame file serves all its frames.
    by_path: dict[Path, list[int]] = {}
    for k, s in enumerate(slices):
        by_path.setdefault(s.path, []).append(k)
    for path, ks in by_path.items():
        frames = [slices[k].frame for k in ks]
        multi = frames[0] is not None
        pixels = _frame_pixels(path, [f for f in frames if f is not None] if multi else None)
        for k in ks:
            s = slices[k]
            plane = pixels[s.frame if s.frame is not None else 0]
            if plane.shape != (s.rows, s.cols):
                raise GeometryError(
                    f"{path.name}: pixel data {plane.shape} does not match Rows/Columns "
                    f"{(s.rows, s.cols)}"
                )
            if s.slope == 1.0 and s.intercept == 0.0:
                array[k] = plane
            else:
                np.multiply(plane, s.slope, out=array[k], casting="unsafe")
                array[k] += np.float32(s.intercept)
        del pixels

    first = layout.first
    frame_numbers = None if ref.frame is None else [int(s.frame or 0) + 1 for s in slices]
    volume = Volume(
        array=array,
        spacing=layout.spacing,
        origin=(float(ref.position[0]), float(ref.position[1]), float(ref.position[2])),
        direction=layout.direction,
        sop_instance_uids=[s.sop_instance_uid for s in slices],
        frame_numbers=frame_numbers,
        modality=_text(first, "Modality"),
        series_instance_uid=ref.series_instance_uid,
        study_instance_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID") or None,
        body_part=_text(first, "BodyPartExamined").upper(),
        anatomic_region=_anatomic_region(first),
        image_type=_image_type(first),
    )
    log.debug(
        "volume built",
        extra={
            "series_uid": volume.series_instance_uid,
            "shape": volume.shape,
            "spacing": volume.spacing,
        },
    )
    return volume


def load_datasets(paths: Sequence[Path], *, min_slices: int = 1) -> list[Dataset]:
    """Headers (no pixels) in the Volume's slice order; a multi-frame header repeats per frame.

    The DICOM writers use this to reference the source image of each mask slice.
    """
    layout = _layout(paths, min_slices)
    cache: dict[Path, Dataset] = {}
    out = []
    for s in layout.slices:
        if s.path not in cache:
            cache[s.path] = _read_header(s.path)
        out.append(cache[s.path])
    return out
