"""Measurements of a finding on the source grid: centroid, location, size, density.

Location in the gland comes from the position along the gland's principal
axis (PCA of the pancreas voxels in millimetres), oriented so that 0 is the
head, i.e. the end towards the patient's right (-x in LPS). The cut points
are the conventional thirds with the neck in front of the portal confluence.
"""

from __future__ import annotations

import contextlib

import numpy as np
import numpy.typing as npt
from scipy.spatial import ConvexHull, QhullError

from pipelines.pancreas.output import PancreasLocation

__all__ = [
    "LOCATION_CUTS",
    "centroid_lps",
    "long_axis_diameter_mm",
    "pancreas_location",
    "volume_ml",
    "voxel_to_lps",
]

# Position along the head->tail axis (0..1) where each part ends.
LOCATION_CUTS: tuple[tuple[float, PancreasLocation], ...] = (
    (0.3, "head"), (0.4, "neck"), (0.7, "body"), (1.01, "tail"),
)


def voxel_to_lps(idx_zyx: npt.NDArray[np.floating], spacing: tuple[float, float, float],
                 origin: tuple[float, float, float],
                 direction: tuple[float, ...]) -> npt.NDArray[np.float64]:
    """(N, 3) voxel indices (z, y, x) -> (N, 3) LPS mm."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    ijk = np.asarray(idx_zyx, dtype=np.float64)[:, ::-1] * np.asarray(spacing)
    return ijk @ d.T + np.asarray(origin)


def centroid_lps(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float],
                 origin: tuple[float, float, float],
                 direction: tuple[float, ...]) -> tuple[float, float, float]:
    idx = np.argwhere(mask)
    c = voxel_to_lps(idx.mean(axis=0, keepdims=True), spacing, origin, direction)[0]
    return (float(c[0]), float(c[1]), float(c[2]))


def volume_ml(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def long_axis_diameter_mm(mask: npt.NDArray[np.bool_],
                          spacing: tuple[float, float, float]) -> float:
    """Largest distance across the lesion in 3D, from voxel *edges* (centres span one
    voxel less than the object: a 5-voxel line at 2 mm is 10 mm long, not 8)."""
    idx = np.argwhere(mask).astype(np.float64)
    if len(idx) == 0:
        return 0.0
    pts = idx[:, ::-1] * np.asarray(spacing)
    if len(pts) > 8:
        # A flat or degenerate set has no hull: brute force on all points below.
        with contextlib.suppress(QhullError):
            pts = pts[ConvexHull(pts).vertices]
    if len(pts) > 3000:
        pts = pts[:: len(pts) // 3000 + 1]
    i, j, d2 = _farthest_pair(pts)
    dmax = float(np.sqrt(d2)) if len(pts) > 1 else 0.0
    if dmax == 0.0:
        return float(max(spacing))
    # Add one voxel extent along the measured direction.
    u = np.abs(pts[i] - pts[j]) / dmax
    return dmax + float(np.dot(u, np.asarray(spacing)))


def _farthest_pair(pts: npt.NDArray[np.float64],
                   rows: int = 256) -> tuple[int, int, float]:
    """The first (row-major) pair of points farthest apart, and their squared distance.

    A block of rows at a time: the full (n, n, 3) difference array of 3000 points
    would be 216 MB, and its square as much again. The same arithmetic per pair as
    the full array, so the same pair and the same distance to the bit.
    """
    best, bi, bj = -1.0, 0, 0
    for start in range(0, len(pts), rows):
        diff = pts[start:start + rows, None, :] - pts[None, :, :]
        d2 = (diff**2).sum(-1)
        k = int(np.argmax(d2))
        if float(d2.flat[k]) > best:  # strictly: an earlier block keeps a tie
            best = float(d2.flat[k])
            bi, bj = start + k // len(pts), k % len(pts)
    return bi, bj, best


def pancreas_axis(pancreas_lps: npt.NDArray[np.float64]) -> tuple[npt.NDArray, npt.NDArray]:
    """Centre and unit principal axis of the gland, pointing from head to tail (+x LPS)."""
    centre = pancreas_lps.mean(axis=0)
    _, _, vt = np.linalg.svd(pancreas_lps - centre, full_matrices=False)
    axis = vt[0]
    if axis[0] < 0:  # the tail lies towards the patient's left: +x in LPS
        axis = -axis
    return centre, axis


def pancreas_location(point_lps: tuple[float, float, float],
                      pancreas_lps: npt.NDArray[np.float64]) -> PancreasLocation:
    """Head / neck / body / tail from the point's position along the gland's axis."""
    centre, axis = pancreas_axis(pancreas_lps)
    proj = (pancreas_lps - centre) @ axis
    lo, hi = float(np.percentile(proj, 1)), float(np.percentile(proj, 99))
    t = (float((np.asarray(point_lps) - centre) @ axis) - lo) / max(hi - lo, 1e-6)
    t = min(max(t, 0.0), 1.0)
    for cut, name in LOCATION_CUTS:
        if t < cut:
            return name
    return "tail"
