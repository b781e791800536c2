"""Calibrated probabilities: reliability, expected calibration error, and the fitted maps.

Why: a reader told "0.80" should be right to read it as "about four in five
such cases are positive". A network's scores are ranked well (AUROC) long
before they are calibrated, so ``ainode evaluate`` measures how far they are
(expected calibration error, ECE, and a reliability diagram) and
``ainode calibrate`` fits a monotone map on a validation set that a model
package then carries (``model.yaml``, ``calibration:``). The pipeline applies
it to the scores it reports; every reader-facing place names the value
"calibrated" when it is.

Two maps, both monotone so that the ranking (AUROC, AP, FROC) is kept:

* ``temperature``: ``p' = sigmoid(logit(p) / T)``, one parameter fitted by
  maximum likelihood (Guo et al. 2017). It cannot move a score's centre, only
  sharpen or soften it, so it cannot over-fit tens of cases;
* ``isotonic``: the pool-adjacent-violators fit of the positive rate on the
  score (Zadrozny and Elkan 2002), each block's rate shrunk as (k + 1) / (n + 2)
  so that a block of a few cases never claims certainty, interpolated
  linearly between the blocks' mean scores.

This module is light (numpy, scipy, pydantic): the package manifest imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "BINS",
    "CalibrationEntry",
    "Method",
    "ScoreMap",
    "ece",
    "fit",
    "reliability",
    "reliability_png",
]

Method = Literal["temperature", "isotonic"]
BINS = 10  # equal-width confidence bins of the ECE and the reliability diagram
_EPS = 1e-6


class ScoreMap(BaseModel):
    """One fitted map from a raw score to a calibrated probability."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    temperature: float | None = None  # temperature
    x: list[float] = Field(default_factory=list)  # isotonic: raw scores, increasing
    y: list[float] = Field(default_factory=list)  # isotonic: calibrated values there

    @model_validator(mode="after")
    def _complete(self) -> ScoreMap:
        if self.method == "temperature":
            if self.temperature is None or not self.temperature > 0:
                raise ValueError("a temperature map needs a temperature > 0")
        else:
            if not self.x or len(self.x) != len(self.y):
                raise ValueError("an isotonic map needs x and y of one length")
            if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)) or \
                    any(b < a for a, b in zip(self.y, self.y[1:], strict=False)):
                raise ValueError("an isotonic map must be non-decreasing")
            if not all(0.0 <= v <= 1.0 for v in self.y):
                raise ValueError("isotonic values must lie in 0..1")
        return self

    def apply(self, p: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The calibrated probabilities of raw scores ``p`` (0..1)."""
        a = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
        if self.method == "temperature":
            assert self.temperature is not None
            out = _sigmoid(_logit(a) / self.temperature)
        else:
            out = np.interp(a, self.x, self.y)
        return np.clip(out, 0.0, 1.0)

    def apply_one(self, p: float) -> float:
        return float(self.apply([p])[0])

    def describe(self) -> str:
        """``temperature T=1.83`` or ``isotonic, 7 steps``: what provenance and cards say."""
        if self.method == "temperature":
            return f"temperature T={self.temperature:.3g}"
        return f"isotonic, {len(self.x)} steps"


class CalibrationEntry(BaseModel):
    """A model package's calibration (``model.yaml``, ``calibration:``), per score it reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient: ScoreMap | None = None  # the patient-level probability
    lesion: ScoreMap | None = None  # each lesion's confidence
    fitted_on: str  # which data, in words (set name, folder, cases)
    details: dict[str, Any] = Field(default_factory=dict)  # ECE before/after, command

    def describe(self) -> str:
        parts = [f"{k} {m.describe()}" for k, m in (("patient", self.patient),
                                                    ("lesion", self.lesion)) if m is not None]
        return "; ".join(parts) + f" (fitted on {self.fitted_on})"


def _logit(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.asarray(np.log(q) - np.log1p(-q))


def _sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def _arrays(p: Sequence[float] | npt.ArrayLike, y: Sequence[bool] | npt.ArrayLike
            ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    pa = np.clip(np.asarray(p, np.float64).ravel(), 0.0, 1.0)
    ya = np.asarray(y, np.float64).ravel()
    if pa.shape != ya.shape:
        raise ValueError(f"{pa.size} scores but {ya.size} labels")
    return pa, ya


def reliability(p: npt.ArrayLike, y: npt.ArrayLike, bins: int = BINS) -> list[dict[str, Any]]:
    """Per equal-width bin: its range, how many scores, their mean, the positive rate."""
    pa, ya = _arrays(p, y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(pa, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                    "mean_probability": float(pa[sel].mean()) if n else None,
                    "positive_rate": float(ya[sel].mean()) if n else None})
    return out


def ece(p: npt.ArrayLike, y: npt.ArrayLike, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean |positive rate - mean score| per bin.

    NaN for no scores. Equal-width bins (Guo et al.), so figures from two
    evaluations are comparable whatever their score distributions.
    """
    pa, ya = _arrays(p, y)
    if pa.size == 0:
        return float("nan")
    total = 0.0
    for b in reliability(pa, ya, bins):
        if b["n"]:
            total += b["n"] * abs(b["positive_rate"] - b["mean_probability"])
    return total / pa.size


def _fit_temperature(p: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> ScoreMap:
    from scipy.optimize import minimize_scalar

    z = _logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(_sigmoid(z / math.exp(log_t)), _EPS, 1.0 - _EPS)
        return float(-(y * np.log(q) + (1.0 - y) * np.log1p(-q)).sum())

    res = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
    return ScoreMap(method="temperature", temperature=round(math.exp(float(res.x)), 6))


def _fit_isotonic(p: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> ScoreMap:
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    # Pool adjacent violators on (sum of labels, count, sum of scores) blocks; equal
    # scores start in one block, so a tie is never split into two values.
    blocks: list[list[float]] = []
    for s in np.unique(ps):
        sel = ps == s
        blocks.append([float(ys[sel].sum()), float(sel.sum()), float(ps[sel].sum())])
        while len(blocks) > 1 and (blocks[-2][0] / blocks[-2][1]
                                   >= blocks[-1][0] / blocks[-1][1]):
            k, n, t = blocks.pop()
            blocks[-1][0] += k
            blocks[-1][1] += n
            blocks[-1][2] += t
    xs = [t / n for _, n, t in blocks]
    vs = [(k + 1.0) / (n + 2.0) for k, n, _ in blocks]
    vs = list(np.maximum.accumulate(vs))  # the shrinkage may break monotony by a hair
    return ScoreMap(method="isotonic", x=[round(v, 6) for v in xs],
                    y=[round(float(v), 6) for v in vs])


def fit(p: npt.ArrayLike, y: npt.ArrayLike, method: Method = "temperature") -> ScoreMap:
    """Fit ``method`` to raw scores ``p`` and their outcomes ``y`` (True: positive)."""
    pa, ya = _arrays(p, y)
    if pa.size < 2 or ya.min() == ya.max():
        raise ValueError(f"calibration needs positives and negatives; got {int(ya.sum())} "
                         f"positive of {pa.size}")
    if method == "temperature":
        return _fit_temperature(pa, ya)
    if method == "isotonic":
        return _fit_isotonic(pa, ya)
    raise ValueError(f"unknown calibration method {method!r}")


def reliability_png(path: Path, curves: Mapping[str, tuple[Sequence[float], Sequence[bool]]],
                    title: str, bins: int = BINS) -> Path:
    """A reliability diagram: per curve, positive rate against mean score per bin, with ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for name, (p, y) in curves.items():
        rel = [b for b in reliability(p, y, bins) if b["n"]]
        if not rel:
            continue
        ax.plot([b["mean_probability"] for b in rel], [b["positive_rate"] for b in rel],
                marker="o", lw=1.5, label=f"{name} (ECE {ece(p, y, bins):.3f}, "
                f"n={np.asarray(p).size})")
    ax.set(xlabel="mean predicted probability (per bin)", ylabel="observed positive rate",
           title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
