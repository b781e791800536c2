"""Input and feature drift statistics: a recent window against a model package's reference.

Pure functions (no database, no network) so that ``ainode evaluate`` can compute a
reference on a validation set and the node can compare its recent jobs to it with
the same code. Per descriptor: population stability index (PSI, on the reference's
deciles) and the two-sample Kolmogorov-Smirnov p value; on the feature summary:
the maximum mean discrepancy (RBF kernel, median-heuristic bandwidth) with a
seeded permutation p value; outliers: series whose descriptors lie beyond a
robust z limit of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

#: Descriptors computed from the image inside the organ mask (stage-1 output).
INTENSITY_KEYS = ("organ_mean", "organ_sd", "organ_p05", "organ_p95", "organ_noise")


def intensity_descriptors(image: npt.NDArray[Any], mask: npt.NDArray[Any]) -> dict[str, float]:
    """HU / intensity statistics inside the organ; empty when the mask is empty.

    Why inside the organ: contrast phase and noise change the organ's values first,
    and the whole-volume histogram is dominated by air and fat.
    """
    m = np.asarray(mask) > 0
    vals = np.asarray(image[m], dtype=np.float64)
    if vals.size == 0:
        return {}
    p05, p95 = np.percentile(vals, [5, 95])
    out = {"organ_mean": float(vals.mean()), "organ_sd": float(vals.std()),
           "organ_p05": float(p05), "organ_p95": float(p95)}
    # Noise apart from texture: neighbours along a row, both in the organ, differ by
    # sqrt(2) times the noise where the tissue is smooth (a dose or kernel change
    # moves this while the mean stays put).
    pair = m[..., 1:] & m[..., :-1]
    if pair.any():
        diff = (np.asarray(image[..., 1:], np.float64)[pair]
                - np.asarray(image[..., :-1], np.float64)[pair])
        mad = float(np.median(np.abs(diff - np.median(diff)))) * 1.4826
        out["organ_noise"] = mad / float(np.sqrt(2.0))
    return out


def psi(reference: npt.ArrayLike, recent: npt.ArrayLike, bins: int = 10) -> float:
    """Population stability index on the reference's quantile bins (0: same; >0.25: shifted)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(recent, dtype=np.float64)
    # Why fewer bins on small samples: ten deciles of 16 values leave empty bins whose
    # log term makes PSI large for an unshifted stream.
    bins = max(2, min(bins, min(ref.size, cur.size) // 4))
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    if edges.size < 2:
        edges = np.array([ref.min() - 0.5, ref.max() + 0.5])
    edges[0], edges[-1] = -np.inf, np.inf
    eps = 1e-3
    p = np.histogram(ref, edges)[0] / ref.size + eps
    q = np.histogram(cur, edges)[0] / cur.size + eps
    return float(np.sum((q - p) * np.log(q / p)))


def ks_pvalue(reference: npt.ArrayLike, recent: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov p value (small: the distributions differ)."""
    return float(stats.ks_2samp(np.asarray(reference, float), np.asarray(recent, float)).pvalue)


def _rbf(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], gamma: float
) -> npt.NDArray[np.float64]:
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-gamma * d)


def mmd(reference: npt.ArrayLike, recent: npt.ArrayLike, *, permutations: int = 200,
        seed: int = 0) -> tuple[float, float]:
    """Squared MMD (biased estimate) and its permutation p value on standardised features.

    Features are standardised by the reference so that no single channel's scale
    decides; the bandwidth is the median pairwise distance of the pooled sample.
    """
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    cur = np.atleast_2d(np.asarray(recent, dtype=np.float64))
    mu, sd = ref.mean(0), ref.std(0)
    sd[sd == 0] = 1.0
    pooled = (np.vstack([ref, cur]) - mu) / sd
    d = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    med = float(np.median(d[d > 0])) if np.any(d > 0) else 1.0
    gamma = 1.0 / (2 * med * med)
    k = _rbf(pooled, pooled, gamma)
    n = ref.shape[0]

    def stat(idx: npt.NDArray[np.int64]) -> float:
        x, y = idx[:n], idx[n:]
        return float(k[np.ix_(x, x)].mean() + k[np.ix_(y, y)].mean() - 2 * k[np.ix_(x, y)].mean())

    base = np.arange(pooled.shape[0])
    observed = stat(base)
    rng = np.random.default_rng(seed)
    hits = sum(stat(rng.permutation(base)) >= observed for _ in range(permutations))
    return observed, (hits + 1) / (permutations + 1)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a comparison is an alert (config ``qa:``)."""

    psi: float = 0.25
    ks_p: float = 0.01
    mmd_p: float = 0.01
    outlier_z: float = 4.0
    min_window: int = 5


@dataclass(slots=True)
class DriftReport:
    """One comparison: statistics per descriptor, the feature test, outliers, alerts."""

    n_reference: int
    n_recent: int
    descriptors: dict[str, dict[str, float]] = field(default_factory=dict)
    feature_mmd: float | None = None
    feature_mmd_p: float | None = None
    outliers: list[tuple[str, str, float]] = field(default_factory=list)  # (series, key, z)
    alerts: list[str] = field(default_factory=list)


def compare(reference: list[dict[str, Any]], recent: list[dict[str, Any]],
            thresholds: Thresholds = Thresholds(), *, seed: int = 0) -> DriftReport:
    """Compare records (``{"series": uid, "descriptors": {...}, "features": [...]}``).

    A descriptor alerts when both PSI and KS agree (PSI above its limit and KS p
    below its limit), so one odd bin on a small window does not page anyone.
    """
    rep = DriftReport(len(reference), len(recent))
    if len(recent) < thresholds.min_window or len(reference) < 2:
        return rep
    keys = sorted(set().union(*(r["descriptors"] for r in reference))
                  & set().union(*(r["descriptors"] for r in recent)))
    for key in keys:
        ref = np.array([r["descriptors"][key] for r in reference if key in r["descriptors"]], float)
        cur = np.array([r["descriptors"][key] for r in recent if key in r["descriptors"]], float)
        if ref.size < 2 or cur.size < 2:
            continue
        s = {"psi": psi(ref, cur), "ks_p": ks_pvalue(ref, cur)}
        rep.descriptors[key] = s
        if s["psi"] > thresholds.psi and s["ks_p"] < thresholds.ks_p:
            rep.alerts.append(f"{key}: PSI {s['psi']:.2f}, KS p {s['ks_p']:.2g}")
        med = float(np.median(ref))
        mad = float(np.median(np.abs(ref - med))) * 1.4826 or float(ref.std()) or 1.0
        for r in recent:
            if key in r["descriptors"]:
                z = (float(r["descriptors"][key]) - med) / mad
                if abs(z) > thresholds.outlier_z:
                    rep.outliers.append((str(r.get("series", "?")), key, round(z, 2)))
    ref_f = [r["features"] for r in reference if r.get("features")]
    cur_f = [r["features"] for r in recent if r.get("features")]
    if len(ref_f) >= 2 and len(cur_f) >= 2:
        rep.feature_mmd, rep.feature_mmd_p = mmd(ref_f, cur_f, seed=seed)
        if rep.feature_mmd_p < thresholds.mmd_p:
            rep.alerts.append(f"features: MMD {rep.feature_mmd:.3f}, p {rep.feature_mmd_p:.2g}")
    return rep
