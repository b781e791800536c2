"""Real-world figures from readers' verdicts and reference diagnoses, with bootstrap intervals.

Why apart from the PANORAMA metrics: there the ground truth is a label map for
every case; in the reading room it is what readers said about the findings
they were shown and, for some series, a diagnosis learned later. The figures
are what those answers support, and no more:

* **PPV of findings**: of the region findings readers rated, the share they
  agreed with. A finding's rating is the majority of its readers' newest
  verdicts, ``uncertain`` not voting; a tie, or only ``uncertain``, leaves it
  unrated (counted, not guessed).
* **FP per series**: disagreed findings per reviewed series (a series with at
  least one verdict or a reference diagnosis).
* **Sensitivity / specificity** where references exist: of the series whose
  reference is positive, the share with at least one region finding readers
  did not reject; of the negative ones, the share with none.

Intervals are 95% percentile bootstrap intervals over series (the unit the
readers reviewed), seeded, so the same records give the same figures. Pure
functions of plain records: ``node.live`` reads them from the database.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["FindingRecord", "Rating", "SeriesRecord", "figures", "live_report", "rating"]

Rating = Literal["tp", "fp", "unrated"]
FIGURES = ("ppv", "fp_per_series", "sensitivity", "specificity")


def rating(verdicts: Iterable[str]) -> Rating:
    """A finding's rating from its readers' verdicts (newest per reader), by majority."""
    votes = [v for v in verdicts if v in ("agree", "disagree")]
    agree = sum(v == "agree" for v in votes)
    disagree = len(votes) - agree
    if agree > disagree:
        return "tp"
    if disagree > agree:
        return "fp"
    return "unrated"


@dataclass(frozen=True, slots=True)
class FindingRecord:
    finding_id: int
    rating: Rating
    probability: float | None = None


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    """One series a model judged: its region findings and, when known, its reference."""

    series_uid: str
    findings: tuple[FindingRecord, ...] = ()
    reference_positive: bool | None = None
    reviewed: bool = False  # a verdict on any of its findings, or a reference
    groups: dict[str, str] = field(default_factory=dict)  # scanner, protocol


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def figures(recs: Sequence[SeriesRecord]) -> dict[str, float]:
    """The point figures of ``recs`` (NaN where the denominator is empty)."""
    tp = sum(f.rating == "tp" for r in recs for f in r.findings)
    fp = sum(f.rating == "fp" for r in recs for f in r.findings)
    reviewed = sum(r.reviewed for r in recs)
    pos = [r for r in recs if r.reference_positive is True]
    neg = [r for r in recs if r.reference_positive is False]

    def detected(r: SeriesRecord) -> bool:
        return any(f.rating != "fp" for f in r.findings)

    return {
        "ppv": _ratio(tp, tp + fp),
        "fp_per_series": _ratio(fp, reviewed),
        "sensitivity": _ratio(sum(detected(r) for r in pos), len(pos)),
        "specificity": _ratio(sum(not detected(r) for r in neg), len(neg)),
    }


def counts(recs: Sequence[SeriesRecord]) -> dict[str, int]:
    ratings = [f.rating for r in recs for f in r.findings]
    return {
        "series": len(recs),
        "reviewed_series": sum(r.reviewed for r in recs),
        "findings": len(ratings),
        "agreed": ratings.count("tp"),
        "disagreed": ratings.count("fp"),
        "unrated": ratings.count("unrated"),
        "reference_positive": sum(r.reference_positive is True for r in recs),
        "reference_negative": sum(r.reference_positive is False for r in recs),
    }


def _bootstrap(recs: Sequence[SeriesRecord], fn: Callable[[Sequence[SeriesRecord]],
               dict[str, float]], n: int, seed: int) -> dict[str, tuple[float | None,
                                                                      float | None]]:
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in FIGURES}
    if recs:
        for _ in range(n):
            idx = rng.integers(0, len(recs), len(recs))
            for k, v in fn([recs[i] for i in idx]).items():
                samples[k].append(v)
    out: dict[str, tuple[float | None, float | None]] = {}
    for k, vals in samples.items():
        a = np.asarray(vals, dtype=float)
        a = a[np.isfinite(a)]
        out[k] = (_r(float(np.percentile(a, 2.5))), _r(float(np.percentile(a, 97.5)))) \
            if len(a) else (None, None)
    return out


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 4)


def summary(recs: Sequence[SeriesRecord], n_boot: int = 1000, seed: int = 0
            ) -> dict[str, Any]:
    """Every figure as ``{value, ci95}`` plus the counts behind them."""
    point = figures(recs)
    ci = _bootstrap(recs, figures, n_boot, seed)
    return {"counts": counts(recs),
            **{k: {"value": _r(point[k]), "ci95": list(ci[k])} for k in FIGURES}}


def live_report(recs: Sequence[SeriesRecord], *, n_boot: int = 1000, seed: int = 0,
                by: Sequence[str] = ("scanner", "protocol")) -> dict[str, Any]:
    """The overall figures and the same per value of each grouping in ``by``."""
    out: dict[str, Any] = {"overall": summary(recs, n_boot, seed), "by": {}}
    for key in by:
        groups: dict[str, list[SeriesRecord]] = {}
        for r in recs:
            groups.setdefault(r.groups.get(key) or "(unknown)", []).append(r)
        out["by"][key] = {name: summary(g, n_boot, seed) for name, g in sorted(groups.items())}
    return out
