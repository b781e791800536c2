"""Is this series something the pancreas models can judge? The applicability step.

Why its own step: the demo models answer *something* for any input, and on a
head CT, a brain MR or a real abdomen unlike their training data they used to
report "lesions" at p = 1.00. A second reader is worth only what it does not
invent, so before anything is reported three checks run, each cheap and each
recorded in the result's provenance (what ran, its values, what failed):

1. **series** (before any model runs): the modality the pipeline is for, the
   body part when the header names one, no localizer, and a field of view
   and body outline that can hold an adult upper abdomen;
2. **anatomy** (after stage 1): the stage-1 "pancreas" is plausible in size,
   one main component, inside the body, away from its edge, in front of the
   spine and (CT) not bone;
3. **competence** (after stage 2): the case's pooled stage-2 features are not
   far (Mahalanobis, Ledoit-Wolf shrinkage) from those of the training data,
   with the threshold and statistics stored in the model package.

A failed check makes the result ``not_assessable`` with a reason that names
the check; the report then carries no lesion and no segment.

Geometry: the anatomy rules speak of patient directions (anterior, midline),
so they run on a coarse copy of the image resampled onto an axis-aligned LPS
grid (:func:`coarse_view`): array axes are (S, P, L), whatever the
acquisition plane or the patient position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from pipelines.preprocess import resample_like
from storage.image_kind import is_localizer_type

__all__ = [
    "ANATOMY",
    "COMPETENCE",
    "SERIES",
    "Applicability",
    "Check",
    "CoarseView",
    "anatomy_check",
    "body_part_verdict",
    "coarse_view",
    "competence_check",
    "mahalanobis",
    "series_check",
]

SERIES, ANATOMY, COMPETENCE = "series", "anatomy", "competence"

# --- thresholds, each with why ---------------------------------------------------------

# Field of view (physical extent of the scan along the patient's axes). Conservative on
# purpose: they refuse only what cannot hold the gland at all, the body outline and the
# anatomy check do the rest. The pancreas runs about 12-15 cm from head to tail across
# the midline, so a field under 16 cm left-right cannot hold it; it lies 5-10 cm in front
# of the back, so under 12 cm antero-posterior neither. Its head alone is about 3 cm
# tall: a slab under 3 cm cannot show a lesion in context (the Siemens example series,
# a real abdomen, is a 4 cm slab, so 3 cm keeps such partial scans).
MIN_FOV_LR_MM = 160.0
MIN_FOV_AP_MM = 120.0
MIN_FOV_SI_MM = 30.0
# Body outline: an adult head is at most about 16-17 cm wide, an adult abdomen at the
# pancreas level at least about 23 cm even when slim. A whole body outline (not touching
# the sides of the field) narrower than 18 cm is a head, neck or limb, not an abdomen.
MIN_BODY_WIDTH_MM = 180.0
CT_BODY_HU = -500.0  # body = largest component above this (air and lung are below)
CT_BONE_HU = 200.0  # cortical and dense cancellous bone; contrast vessels rarely stay above
# Anatomy: a whole adult gland is about 40-120 ml (atrophy down to ~20, swelling or a large
# tumour up to ~200). When the scan covers less than REFERENCE_SI_MM of it, the lower
# bound scales with the covered fraction (a 4 cm slab may hold only a fifth of the
# gland's height); the upper bound never relaxes.
MIN_PANCREAS_ML = 20.0
MAX_PANCREAS_ML = 200.0
REFERENCE_SI_MM = 100.0
MIN_MAIN_FRACTION = 0.5  # "one main component": the largest holds most of the volume
MIN_INSIDE_BODY = 0.9  # the gland lies inside the body outline
# The gland lies deep: behind the abdominal wall, bowel or liver in front and the
# kidneys and back muscles behind, at least ~3 cm from the skin in a slim adult. Ribs
# and costal cartilage (where the demo weights put their "pancreas" on real CT) lie
# within 1-2 cm of it.
MIN_DEPTH_MM = 25.0
# "The gland lies largely on bone": its median above 180 HU, or a fifth of it above 300
# HU (denser than any enhancing soft tissue). Enhancing parenchyma peaks at ~120-150 HU,
# and a hyperenhancing tumour (PNET, 150-250 HU arterial) lifts a gland's mean above 150
# HU (4 of 380 generator phantoms with a large PNET: mean 157-172, median 138-157 HU,
# measured); the demo weights' "pancreas" on the rib cage of the TotalSegmentator
# example CT has a median of 188 HU with 30% of it above 300 HU.
MAX_MEDIAN_HU = 180.0
BONE_FRACTION_HU = 300.0
MAX_BONE_FRACTION = 0.2
SPINE_HALF_WIDTH_MM = 30.0  # the vertebral body, within 3 cm of the body's midline
MIN_SPINE_VOXELS = 10  # fewer bone voxels there: no spine found, that rule is skipped

# Body parts (BodyPartExamined, or the anatomic region's code meaning) normalised to
# upper-case letters only. A value naming the abdomen passes; one naming only another
# region is not assessable; anything else (empty, unknown, PARTIALBODY) passes on to the
# image-based checks, because a hospital may leave it empty or write its own words.
_ABDOMINAL_WORDS = ("ABDOMEN", "ABDOMINAL", "ABD", "PANCREAS", "WHOLEBODY", "TRUNK",
                    "TORSO", "LIVER", "KIDNEY", "UPPERGI", "BODY")
_OTHER_REGIONS = ("BRAIN", "HEAD", "SKULL", "NECK", "ORBIT", "SINUS", "FACE", "IAC",
                  "EAR", "CSPINE", "TSPINE", "LSPINE", "SPINE", "EXTREMITY", "ARM",
                  "HAND", "WRIST", "ELBOW", "SHOULDER", "LEG", "KNEE", "ANKLE", "FOOT",
                  "HIP", "THIGH", "BREAST", "HEART", "CHEST", "THORAX", "LUNG", "PELVIS",
                  "PROSTATE", "BLADDER")


@dataclass(slots=True)
class Check:
    """One check: whether it passed (None: skipped), the values it judged, why it failed."""

    name: str
    passed: bool | None
    values: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # the rules that failed, in words

    @property
    def reason(self) -> str:
        return f"{self.name} check: {'; '.join(self.failed)}"

    def as_dict(self) -> dict[str, Any]:
        state = "skipped" if self.passed is None else "passed" if self.passed else "failed"
        return {"state": state, "values": _json(self.values), "failed": list(self.failed)}


@dataclass(slots=True)
class Applicability:
    """The checks that ran on one series, in order; the first failed one decides."""

    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if c.passed is False), None)

    @property
    def reason(self) -> str | None:
        f = self.failed
        return None if f is None else f.reason

    def provenance(self) -> dict[str, Any]:
        """Nested (every check) plus flat scalars (the job row keeps only those)."""
        f = self.failed
        return {
            "applicability": {c.name: c.as_dict() for c in self.checks},
            "applicability_checks": ",".join(c.name for c in self.checks),
            "applicability_failed": None if f is None else f.name,
        }


def _json(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, float | np.floating):
            out[k] = round(float(v), 3)
        elif isinstance(v, np.integer | np.bool_):
            out[k] = v.item()
        elif isinstance(v, tuple | list):
            out[k] = [round(float(x), 3) if isinstance(x, float | np.floating) else x
                      for x in v]
        else:
            out[k] = v
    return out


# --- the coarse, axis-aligned view ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoarseView:
    """The image on an axis-aligned LPS grid: ``array`` is (S, P, L), i.e. z, y, x."""

    grid: sitk.Image  # the reference grid (identity direction)
    array: npt.NDArray[np.float32]
    body: npt.NDArray[np.bool_]
    spacing: float  # isotropic, mm
    fov_mm: tuple[float, float, float]  # physical extent of the source along L, P, S
    body_width_mm: float  # widest left-right extent of the body outline over slices
    body_touches_sides: bool  # the outline reaches the left or right end of the field

    def body_on(self, grid: sitk.Image) -> npt.NDArray[np.bool_]:
        """The body outline taken onto ``grid`` (nearest): where a gland may lie."""
        return _mask_onto(self.body, self.grid, grid)

    def to_grid(self, mask: npt.NDArray[np.bool_], grid: sitk.Image) -> npt.NDArray[np.bool_]:
        """A mask on ``grid`` (any orientation) resampled onto this view (nearest)."""
        return _mask_onto(mask, grid, self.grid)


def _mask_onto(mask: npt.NDArray[np.bool_], on: sitk.Image,
               onto: sitk.Image) -> npt.NDArray[np.bool_]:
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(on)
    return sitk.GetArrayFromImage(resample_like(m, onto, label=True)).astype(bool)


def _bounds(img: sitk.Image) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The physical box (LPS min and max) of the voxel centres of ``img``."""
    size = np.array(img.GetSize())
    corners = [img.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in np.array([i, j, k]) * (size - 1)])
        for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    pts = np.array(corners, dtype=np.float64)
    return pts.min(axis=0), pts.max(axis=0)


def _otsu(values: npt.NDArray[np.float32]) -> float:
    """Otsu's threshold, on values clipped to their 99.5th percentile.

    Clipped because a few very bright voxels (vessels, fat, artefacts) would
    otherwise stretch the histogram so far that all tissue fell in its first bin.
    """
    values = np.minimum(values, np.percentile(values, 99.5))
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w = hist.astype(np.float64)
    w0 = np.cumsum(w)
    w1 = w0[-1] - w0
    m = np.cumsum(w * centres)
    mu0 = m / np.maximum(w0, 1e-9)
    mu1 = (m[-1] - m) / np.maximum(w1, 1e-9)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))]) if len(between) > 1 else 0.0


def body_outline(array: npt.NDArray[np.float32], modality: str) -> npt.NDArray[np.bool_]:
    """The body: CT above -500 HU, MR above an Otsu threshold; largest component, filled.

    Filled slice by slice so that air in bowel and the lungs' inside count as body.
    For MR, Otsu runs on log intensities: on T1 the bright subcutaneous and visceral
    fat is so large a class that Otsu on the raw values splits fat from the other
    tissues instead of the body from the air (measured on generator MR phantoms: 27%
    of the volume kept as body, of 60% truly body; 56% with the log).
    """
    if array.size == 0:
        return np.zeros(array.shape, bool)
    if modality == "CT":
        fg = array > CT_BODY_HU
    else:
        vals = np.log1p(np.maximum(array[np.isfinite(array)], 0.0))
        fg = array > float(np.expm1(_otsu(vals))) if vals.size else \
            np.zeros(array.shape, bool)
    fg = ndimage.binary_opening(fg, iterations=1)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(array.shape, bool)
    sizes = ndimage.sum(fg, labels, index=range(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body


def coarse_view(img: sitk.Image, modality: str, spacing: float = 3.0) -> CoarseView:
    """``img`` on an axis-aligned LPS grid of ``spacing`` mm, with its body outline."""
    lo, hi = _bounds(img)
    src_sp = np.array(img.GetSpacing(), dtype=np.float64)
    d = np.abs(np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3))
    # The extent of the voxels themselves (centres plus half a voxel on each side).
    fov = (hi - lo) + d @ src_sp
    size = [max(1, int(np.ceil((hi[i] - lo[i]) / spacing)) + 1) for i in range(3)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(tuple(float(v) for v in lo))
    default = -1024.0 if modality == "CT" else 0.0
    res = sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, default,
                        sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(res).astype(np.float32)
    body = body_outline(arr, modality)
    width, touches = 0.0, False
    if body.any():
        cols = np.where(body.any(axis=(0, 1)))[0]  # L axis
        touches = bool(cols[0] == 0 or cols[-1] == body.shape[2] - 1)
        per_slice: npt.NDArray[np.bool_] = np.asarray(body.any(axis=1))  # (S, L)
        widths = [(np.where(per_slice[z])[0][-1] - np.where(per_slice[z])[0][0] + 1) * spacing
                  for z in range(per_slice.shape[0]) if per_slice[z].any()]
        width = float(max(widths)) if widths else 0.0
    return CoarseView(grid, arr, body, spacing, (float(fov[0]), float(fov[1]),
                                                 float(fov[2])), width, touches)


# --- 1. the series -------------------------------------------------------------------


def _norm(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalpha())


def body_part_verdict(value: str) -> bool | None:
    """True: names the abdomen; False: names only another region; None: empty/unknown."""
    v = _norm(value)
    if not v:
        return None
    if any(w in v for w in _ABDOMINAL_WORDS):
        return True
    if any(w in v for w in _OTHER_REGIONS):
        return False
    return None


def series_check(view: CoarseView, *, expected_modality: str, modality: str,
                 body_part: str = "", anatomic_region: str = "",
                 image_type: Sequence[str] = ()) -> Check:
    """Modality, body part, localizer, field of view and body size: no model needed."""
    fov_lr, fov_ap, fov_si = view.fov_mm
    check = Check(SERIES, True, {
        "modality": modality or "", "expected_modality": expected_modality,
        "body_part": body_part or "", "anatomic_region": anatomic_region or "",
        "fov_lr_mm": fov_lr, "fov_ap_mm": fov_ap, "fov_si_mm": fov_si,
        "body_width_mm": view.body_width_mm, "body_touches_sides": view.body_touches_sides,
    })
    if modality and modality.upper() != expected_modality.upper():
        check.failed.append(f"modality {modality} (this pipeline is for {expected_modality})")
    for what, value in (("body part", body_part), ("anatomic region", anatomic_region)):
        if body_part_verdict(value) is False:
            check.failed.append(f"{what} {value} is not the abdomen")
    if is_localizer_type(list(image_type)):
        check.failed.append("a localizer image, not a cross-sectional series")
    if fov_lr < MIN_FOV_LR_MM or fov_ap < MIN_FOV_AP_MM or fov_si < MIN_FOV_SI_MM:
        check.failed.append(
            f"field of view {fov_lr:.0f} x {fov_ap:.0f} x {fov_si:.0f} mm (LR x AP x SI) "
            f"is smaller than an upper abdomen needs ({MIN_FOV_LR_MM:.0f} x "
            f"{MIN_FOV_AP_MM:.0f} x {MIN_FOV_SI_MM:.0f} mm)")
    if not view.body.any():
        check.failed.append("no body outline found")
    elif not view.body_touches_sides and view.body_width_mm < MIN_BODY_WIDTH_MM:
        check.failed.append(
            f"the body is {view.body_width_mm:.0f} mm wide, narrower than an adult abdomen "
            f"({MIN_BODY_WIDTH_MM:.0f} mm): a head, neck or limb")
    check.passed = not check.failed
    return check


# --- 2. the anatomy ------------------------------------------------------------------


def anatomy_check(view: CoarseView, mask: npt.NDArray[np.bool_], grid: sitk.Image, *,
                  modality: str, pancreas_ml: float, predicted_ml: float) -> Check:
    """Is stage 1's gland (``mask`` on ``grid``) a plausible pancreas in this body?"""
    si = view.fov_mm[2]
    lower = MIN_PANCREAS_ML * min(1.0, si / REFERENCE_SI_MM)
    main = pancreas_ml / predicted_ml if predicted_ml > 0 else 0.0
    check = Check(ANATOMY, True, {"pancreas_ml": pancreas_ml, "predicted_ml": predicted_ml,
                                  "main_fraction": main, "min_ml": lower,
                                  "max_ml": MAX_PANCREAS_ML, "scan_si_mm": si})
    if not lower <= pancreas_ml <= MAX_PANCREAS_ML:
        check.failed.append(f"the gland found is {pancreas_ml:.1f} ml, outside "
                            f"{lower:.1f}-{MAX_PANCREAS_ML:.0f} ml")
    if main < MIN_MAIN_FRACTION:
        check.failed.append(f"the largest component holds only {main:.0%} of the predicted "
                            "pancreas")
    m = view.to_grid(mask, grid)
    if not m.any():  # thinner than one coarse voxel: judge its nearest voxel
        pts = np.argwhere(mask)
        c = grid.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in pts.mean(axis=0)[::-1]])
        k = view.grid.TransformPhysicalPointToIndex(c)
        if all(0 <= k[i] < view.grid.GetSize()[i] for i in range(3)):
            m[k[2], k[1], k[0]] = True
    if m.any() and view.body.any():
        inside = float(view.body[m].mean())
        sp = view.spacing
        # In-plane (per axial slice): the scan's first and last slices are where the
        # field of view ends, not the body's surface.
        depth = np.zeros(view.body.shape, np.float64)
        for z in np.where(m.any(axis=(1, 2)))[0]:
            depth[z] = ndimage.distance_transform_edt(view.body[z], sampling=(sp, sp))
        med_depth = float(np.median(depth[m]))
        check.values.update(inside_body=inside, depth_mm=med_depth)
        if inside < MIN_INSIDE_BODY:
            check.failed.append(f"only {inside:.0%} of the gland lies inside the body")
        if med_depth < MIN_DEPTH_MM:
            check.failed.append(f"the gland lies at the body's edge ({med_depth:.0f} mm "
                                f"deep, a pancreas lies at least {MIN_DEPTH_MM:.0f} mm deep)")
        if modality == "CT":
            _ct_rules(view, m, check)
    elif m.any():
        check.failed.append("no body outline to place the gland in")
    check.passed = not check.failed
    return check


def _ct_rules(view: CoarseView, m: npt.NDArray[np.bool_], check: Check) -> None:
    """CT only: the gland is not bone, and lies in front of the vertebral body."""
    values = view.array[m]
    median_hu = float(np.median(values))
    check.values.update(mean_hu=float(values.mean()), median_hu=median_hu,
                        bone_fraction=float((values > BONE_FRACTION_HU).mean()))
    bone_fraction = float(check.values["bone_fraction"])
    if median_hu > MAX_MEDIAN_HU or bone_fraction >= MAX_BONE_FRACTION:
        check.failed.append(f"the gland lies on bone (median {median_hu:.0f} HU, "
                            f"{bone_fraction:.0%} above {BONE_FRACTION_HU:.0f} HU), "
                            "not pancreas")
    zs = np.where(m.any(axis=(1, 2)))[0]
    body = view.body[zs[0]:zs[-1] + 1]
    arr = view.array[zs[0]:zs[-1] + 1]
    cols = np.where(body.any(axis=(0, 1)))[0]
    rows = np.where(body.any(axis=(0, 2)))[0]
    if not len(cols) or not len(rows):
        check.values["spine"] = "not found"
        return
    sp = view.spacing
    mid = (cols[0] + cols[-1]) / 2.0
    half = SPINE_HALF_WIDTH_MM / sp
    x = np.arange(body.shape[2])
    y = np.arange(body.shape[1])
    near_mid = np.abs(x - mid) <= half
    posterior = y >= rows[0] + 0.4 * (rows[-1] - rows[0])  # the back 60% of the body
    bone = (arr > CT_BONE_HU) & body & near_mid[None, None, :] & posterior[None, :, None]
    if int(bone.sum()) < MIN_SPINE_VOXELS:
        check.values["spine"] = "not found"
        return
    spine_y = float(np.median(np.argwhere(bone)[:, 1]))
    gland_y = float(np.argwhere(m)[:, 1].mean())
    ahead = (spine_y - gland_y) * sp  # LPS: y grows towards posterior
    check.values.update(spine="found", anterior_to_spine_mm=ahead)
    if ahead <= 0:
        check.failed.append(f"the gland lies {-ahead:.0f} mm behind the vertebral body's "
                            "centre, not in front of the spine")


# --- 3. the model's competence ---------------------------------------------------------


def mahalanobis(x: npt.NDArray[np.float64], stats: Mapping[str, npt.NDArray[Any]]) -> float:
    """Distance of ``x`` from the fitted distribution: standardise, then the shrunk precision.

    ``stats`` holds ``mean`` and ``scale`` (per feature) and ``precision`` (the
    inverse of the Ledoit-Wolf covariance of the standardised features); see
    :mod:`pipelines.training.competence`.
    """
    z = (np.asarray(x, np.float64) - stats["mean"]) / stats["scale"]
    return float(np.sqrt(max(float(z @ stats["precision"] @ z), 0.0)))


def competence_check(features: npt.NDArray[np.float64] | None,
                     stats: Mapping[str, npt.NDArray[Any]] | None,
                     threshold: float | None, *, fitted_on: str = "") -> Check:
    """Skipped (and said so) without statistics or features; failed above the threshold."""
    if stats is None or threshold is None:
        return Check(COMPETENCE, None, {"note": "the stage-2 package has no competence "
                                                "statistics; check skipped"})
    if features is None:
        return Check(COMPETENCE, None, {"note": "the stage-2 model gives no pooled "
                                                "features; check skipped"})
    d = mahalanobis(features, stats)
    check = Check(COMPETENCE, True, {"distance": d, "threshold": float(threshold),
                                     "fitted_on": fitted_on})
    if not np.isfinite(d) or d > threshold:
        check.failed.append(
            f"the case lies outside the model's training distribution (feature distance "
            f"{d:.1f} > {threshold:.1f})")
    check.passed = not check.failed
    return check
