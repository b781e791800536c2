"""Lesion candidates from a probability map, and how a patient score is formed.

Dynamic thresholding follows the report-guided-annotation method used by the
PANORAMA baseline (``extract_lesion_candidates``, "dynamic" mode): take the
global peak, keep the connected region above a fraction of *that* peak, give
it the peak as its confidence, remove it, repeat. A fixed threshold would
merge a faint and a confident lesion or drop the faint one; a per-peak
threshold keeps each lesion's extent relative to its own evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = ["Candidate", "combine_score", "extract_candidates"]

ScoreMode = Literal["mean", "max", "classification", "lesion", "product"]


@dataclass(frozen=True, slots=True)
class Candidate:
    mask: npt.NDArray[np.bool_]
    confidence: float
    peak_index: tuple[int, int, int]


def extract_candidates(
    prob: npt.NDArray[np.floating],
    *,
    fraction: float = 0.4,
    min_confidence: float = 0.1,
    max_candidates: int = 10,
    min_voxels: int = 1,
) -> list[Candidate]:
    """Candidates in order of decreasing confidence (the peak probability).

    A region smaller than ``min_voxels`` is removed from the map but not
    reported, so a speck cannot hide the next real peak. Two lesions joined by
    probability above ``min_confidence`` count as one hill: the second is found
    only if the map dips below the floor between them.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must lie in (0, 1)")
    work = np.array(prob, dtype=np.float32, copy=True)
    out: list[Candidate] = []
    structure = ndimage.generate_binary_structure(work.ndim, work.ndim)  # 26-connectivity
    for _ in range(max_candidates * 4):
        if len(out) >= max_candidates:
            break
        flat = int(np.argmax(work))
        peak = float(work.flat[flat])
        if peak < min_confidence:
            break
        idx = np.unravel_index(flat, work.shape)
        labels, _ = ndimage.label(work >= peak * fraction, structure=structure)
        region = labels == labels[idx]
        # Remove the whole hill down to the confidence floor, not only the reported
        # region: its rim below the fraction would otherwise come back as a new,
        # weaker "lesion" around the first one.
        hills, _ = ndimage.label(work >= min_confidence, structure=structure)
        work[hills == hills[idx]] = 0.0
        if int(region.sum()) >= min_voxels:
            out.append(Candidate(region, peak, tuple(int(i) for i in idx)))  # type: ignore[arg-type]
    return out


def combine_score(classification_pdac: float | None, lesion_max: float,
                  mode: ScoreMode = "mean") -> float:
    """The patient-level PDAC score. ``mean`` of the classification probability and the
    lesion map's maximum is what the PANORAMA winner used: either evidence alone can
    be fooled (a benign cyst lights up the map; a diffuse tumour may not)."""
    if classification_pdac is None or mode == "lesion":
        return float(lesion_max)
    c, m = float(classification_pdac), float(lesion_max)
    if mode == "mean":
        return (c + m) / 2.0
    if mode == "max":
        return max(c, m)
    if mode == "classification":
        return c
    if mode == "product":
        return float(np.sqrt(c * m))
    raise ValueError(f"unknown score mode {mode!r}")
