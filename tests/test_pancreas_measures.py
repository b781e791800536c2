"""Location, diameter, volume and centroid on known shapes; score; candidate extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.pancreas.candidates import combine_score, extract_candidates
from pipelines.pancreas.measures import (
    centroid_lps,
    long_axis_diameter_mm,
    pancreas_location,
    volume_ml,
    voxel_to_lps,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _gland(angle_deg: float) -> np.ndarray:
    """A 150 mm x 20 mm x 20 mm bar in LPS mm, its long axis rotated in the axial plane;
    head at the patient's right (-x)."""
    rng = np.random.default_rng(0)
    t = rng.uniform(-75, 75, 4000)
    off = rng.uniform(-10, 10, (4000, 2))
    a = math.radians(angle_deg)
    x = t * math.cos(a) - off[:, 0] * math.sin(a)
    y = t * math.sin(a) + off[:, 0] * math.cos(a)
    return np.stack([x, y, off[:, 1]], axis=1)


@pytest.mark.parametrize("angle", [0.0, 25.0, -30.0])
@pytest.mark.parametrize(("t", "expected"), [
    (0.1, "head"), (0.35, "neck"), (0.55, "body"), (0.9, "tail"),
])
def test_location_along_principal_axis(angle: float, t: float, expected: str) -> None:
    pts = _gland(angle)
    a = math.radians(angle)
    s = -75 + 150 * t
    point = (s * math.cos(a), s * math.sin(a), 0.0)
    assert pancreas_location(point, pts) == expected


def test_location_head_is_patient_right_whatever_the_pca_sign() -> None:
    pts = _gland(0.0)[::-1]  # reversed order must not flip head and tail
    assert pancreas_location((-70.0, 0.0, 0.0), pts) == "head"
    assert pancreas_location((70.0, 0.0, 0.0), pts) == "tail"


def test_diameter_of_a_line_counts_voxel_extent() -> None:
    m = np.zeros((5, 5, 12), bool)
    m[2, 2, 1:6] = True  # five voxels along x at 2 mm
    assert long_axis_diameter_mm(m, (2.0, 1.0, 3.0)) == pytest.approx(10.0)
    m2 = np.zeros((8, 5, 5), bool)
    m2[1:5, 2, 2] = True  # four slices at 3 mm
    assert long_axis_diameter_mm(m2, (2.0, 1.0, 3.0)) == pytest.approx(12.0)


@pytest.mark.parametrize("r_mm", [5.0, 10.0, 17.5])
def test_diameter_and_volume_of_a_sphere(r_mm: float) -> None:
    sp = (0.8, 0.8, 1.0)
    n = int(2 * r_mm / 0.8) + 6
    z, y, x = np.ogrid[:n, :n, :n]
    c = n / 2
    m = ((x - c) * sp[0]) ** 2 + ((y - c) * sp[1]) ** 2 + ((z - c) * sp[2]) ** 2 <= r_mm**2
    assert long_axis_diameter_mm(m, sp) == pytest.approx(2 * r_mm, abs=1.2)
    assert volume_ml(m, sp) == pytest.approx(4 / 3 * math.pi * r_mm**3 / 1000, rel=0.08)


def test_centroid_uses_origin_spacing_and_direction() -> None:
    m = np.zeros((4, 6, 8), bool)
    m[2, 3, 4] = True
    assert centroid_lps(m, (0.5, 0.7, 2.0), (10.0, 20.0, 30.0), IDENTITY) == pytest.approx(
        (12.0, 22.1, 34.0))
    flipped = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert centroid_lps(m, (0.5, 0.7, 2.0), (10.0, 20.0, 30.0), flipped) == pytest.approx(
        (8.0, 17.9, 34.0))
    pts = voxel_to_lps(np.array([[0.0, 0.0, 0.0]]), (1, 1, 1), (1.0, 2.0, 3.0), IDENTITY)
    assert pts[0].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("mode", "expected"), [
    ("mean", 0.5), ("max", 0.8), ("classification", 0.2), ("lesion", 0.8), ("product", 0.4),
])
def test_score_combination(mode: str, expected: float) -> None:
    assert combine_score(0.2, 0.8, mode) == pytest.approx(expected)  # type: ignore[arg-type]


def test_score_without_classification_is_the_lesion_maximum() -> None:
    assert combine_score(None, 0.63) == pytest.approx(0.63)
    with pytest.raises(ValueError):
        combine_score(0.1, 0.2, "median")  # type: ignore[arg-type]


def _blob(shape: tuple[int, int, int], centre: tuple[int, int, int], peak: float,
          sigma: float) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    return (peak * np.exp(-d2 / (2 * sigma**2))).astype(np.float32)


def test_dynamic_threshold_candidates_on_a_known_map() -> None:
    shape = (20, 30, 40)
    p = np.maximum(_blob(shape, (10, 10, 10), 0.9, 2.0), _blob(shape, (10, 20, 30), 0.5, 3.0))
    p[2, 2, 35] = 0.3  # a single-voxel speck
    cands = extract_candidates(p, fraction=0.4, min_confidence=0.1, min_voxels=2)
    assert [round(c.confidence, 3) for c in cands] == [0.9, 0.5]
    assert cands[0].peak_index == (10, 10, 10)
    assert cands[1].peak_index == (10, 20, 30)
    # Each region is exactly the connected voxels above 40% of its own peak.
    first = p >= 0.9 * 0.4
    first[:, 15:, :] = False
    assert np.array_equal(cands[0].mask, first)
    expected_second = (_blob(shape, (10, 20, 30), 0.5, 3.0) >= 0.2) & ~cands[0].mask
    assert np.array_equal(cands[1].mask & expected_second, expected_second)
    assert not (cands[0].mask & cands[1].mask).any()


def test_candidates_stop_at_min_confidence_and_max_count() -> None:
    shape = (10, 10, 50)
    p = np.zeros(shape, np.float32)
    for i, peak in enumerate([0.95, 0.8, 0.6, 0.3, 0.05]):
        p += _blob(shape, (5, 5, 5 + 10 * i), peak, 1.0)
    assert len(extract_candidates(p, min_confidence=0.1)) == 4
    assert len(extract_candidates(p, min_confidence=0.1, max_candidates=2)) == 2
    assert extract_candidates(np.zeros(shape, np.float32)) == []
    with pytest.raises(ValueError):
        extract_candidates(p, fraction=1.5)


def test_farthest_pair_in_blocks_is_the_full_matrix_answer_to_the_bit() -> None:
    """The diameter's pair search runs block by block (a 3000-point hull would need a
    216 MB difference array at once): the same pair, first in row-major order on ties,
    and the same squared distance as the full matrix."""
    from pipelines.pancreas.measures import _farthest_pair

    rng = np.random.default_rng(11)
    for n in (2, 3, 255, 256, 257, 700):
        for pts in (rng.random((n, 3)) * 40.0,  # no ties
                    rng.integers(0, 4, (n, 3)).astype(np.float64) * 0.7):  # many ties
            d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
            i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
            for rows in (1, 5, 256):
                assert _farthest_pair(pts, rows) == (i, j, float(d2.max()))
