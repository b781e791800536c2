"""The pancreas pipeline's quality record: what drift monitoring compares job after job.

Why here and not in the node: ``ainode evaluate`` computes the model package's
reference from the same record on its validation set, so the node's recent
jobs and the reference are comparable only if one function makes both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from pipelines.evaluation.drift import intensity_descriptors

__all__ = ["input_descriptors", "output_descriptors"]


def input_descriptors(img: sitk.Image, gland: npt.NDArray[np.bool_] | None) -> dict[str, float]:
    """Voxel spacing, and the HU / intensity statistics inside the gland stage 1 found.

    The gland rather than the body: a new contrast phase, dose or kernel shows
    first in the organ the models read, and the body's histogram is mostly fat
    and air whatever the protocol.
    """
    sx, _, sz = (float(v) for v in img.GetSpacing())
    out = {"pixel_spacing_mm": round(sx, 4), "slice_spacing_mm": round(sz, 4)}
    if gland is not None and gland.shape == tuple(reversed(img.GetSize())) and gland.any():
        arr = sitk.GetArrayViewFromImage(img)
        out.update({k: round(v, 3) for k, v in intensity_descriptors(arr, gland).items()})
        out["gland_ml"] = round(float(gland.sum()) * sx * float(img.GetSpacing()[1]) * sz
                                / 1000.0, 2)
    return out


def output_descriptors(patient_score: float, raw_patient_score: float | None,
                       confidences: list[float], provenance: dict[str, Any],
                       assessable: bool) -> dict[str, float]:
    """The model's answers before calibration: score, candidate count, top confidence.

    Raw values, because a recalibration changes the reported numbers without the
    model or the input having moved; the competence distance and stage 1's peak
    probability say how sure the networks themselves were.
    """
    out: dict[str, float] = {"assessable": 1.0 if assessable else 0.0}
    if assessable:
        out["patient_score"] = round(float(raw_patient_score if raw_patient_score is not None
                                           else patient_score), 4)
        out["candidates"] = float(len(confidences))
        out["top_confidence"] = round(max(confidences, default=0.0), 4)
    s1 = provenance.get("stage1_max_probability")
    if isinstance(s1, int | float):
        out["stage1_max_probability"] = round(float(s1), 4)
    comp = (provenance.get("applicability") or {}).get("competence") or {}
    dist = (comp.get("values") or {}).get("distance")
    if isinstance(dist, int | float):
        out["competence_distance"] = round(float(dist), 3)
    return out
