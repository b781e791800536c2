"""Calibration of the reported scores, measured by ``ainode evaluate``, fitted by ``calibrate``.

Which pairs are scored: the patient-level probability of every *assessed*
case against "the case is a PDAC" (a declined case shows the reader no
probability, so it has none to be calibrated), and the confidence of every
reported lesion candidate against "it matches a reference lesion" (IoU >=
0.15, the evaluation's own matching). When the package applied a calibration
the records also keep the raw scores, so one evaluation reports the ECE of
what the reader saw and of what the network gave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.calibration import (
    BINS,
    CalibrationEntry,
    Method,
    ece,
    fit,
    reliability,
    reliability_png,
)
from pipelines.evaluation.metrics import CaseRecord

__all__ = ["calibration_lines", "calibration_metrics", "fit_records", "pairs"]

KINDS = ("patient", "lesion")
NAMES = {"patient": "Patient-level PDAC probability", "lesion": "Lesion confidence"}


def pairs(records: list[CaseRecord], kind: str, *, raw: bool = False
          ) -> tuple[list[float], list[bool]] | None:
    """(scores, outcomes) of ``kind``; with ``raw`` the uncalibrated ones (None: none kept)."""
    assessed = [r for r in records if r.assessable]
    if kind == "patient":
        if raw:
            if not assessed or any(r.raw_score is None for r in assessed):
                return None
            return [float(r.raw_score) for r in assessed  # type: ignore[arg-type]
                    ], [r.diagnosis == "PDAC" for r in assessed]
        return [r.score for r in assessed], [r.diagnosis == "PDAC" for r in assessed]
    with_cands = [r for r in assessed if r.cand_conf]
    if raw:
        if not with_cands or any(r.raw_cand_conf is None for r in with_cands):
            return None
        return ([c for r in with_cands for c in r.raw_cand_conf or []],
                [bool(t) for r in with_cands for t in r.cand_tp])
    return ([c for r in with_cands for c in r.cand_conf],
            [bool(t) for r in with_cands for t in r.cand_tp])


def _figures(p: list[float], y: list[bool]) -> dict[str, Any]:
    value = ece(p, y)
    return {"ece": None if value != value else round(value, 4), "n": len(p),
            "positives": int(sum(y)), "reliability": reliability(p, y)}


def calibration_metrics(records: list[CaseRecord], out: Path | None = None) -> dict[str, Any]:
    """ECE and reliability bins per score (as reported, and raw when calibrated); the PNG."""
    result: dict[str, Any] = {"bins": BINS, "binning": "equal width",
                              "applied": any(r.raw_score is not None or r.raw_cand_conf
                                             for r in records)}
    curves: dict[str, tuple[list[float], list[bool]]] = {}
    for kind in KINDS:
        shown = pairs(records, kind)
        assert shown is not None
        entry = _figures(*shown)
        raw = pairs(records, kind, raw=True)
        label = NAMES[kind] + (" (calibrated)" if raw is not None else "")
        if shown[0]:
            curves[label] = shown
        if raw is not None:
            entry["uncalibrated"] = _figures(*raw)
            if raw[0]:
                curves[f"{NAMES[kind]} (uncalibrated)"] = raw
        result[kind] = entry
    if out is not None:
        reliability_png(out / "reliability.png", curves, "Reliability diagram")
        result["diagram"] = "reliability.png"
    return result


def _ece_text(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("ece") is None:
        return "n/a"
    return f"{entry['ece']:.3f} (n={entry['n']}, {entry['positives']} positive)"


def calibration_lines(m: dict[str, Any]) -> list[str]:
    """The markdown rows of metrics.md: ECE per score, before and after when calibrated."""
    cal = m.get("calibration")
    if not cal:
        return []
    lines = ["", f"Calibration: expected calibration error over {cal['bins']} equal-width bins "
             "(patient: assessed cases, positive = PDAC; lesion: reported candidates, "
             "positive = matches a reference lesion); reliability diagram in "
             f"{cal.get('diagram', 'reliability.png')}.", "",
             "| Score | ECE as reported | ECE uncalibrated |", "|---|---|---|"]
    for kind in KINDS:
        e = cal.get(kind, {})
        lines.append(f"| {NAMES[kind]} | {_ece_text(e)} | "
                     f"{_ece_text(e.get('uncalibrated')) if 'uncalibrated' in e else '—'} |")
    return lines


def fit_records(records: list[CaseRecord], method: Method, fitted_on: str,
                details: dict[str, Any] | None = None) -> CalibrationEntry:
    """A package's calibration fitted on uncalibrated records (both scores, where possible).

    A score with only positives or only negatives in the set gets no map (and
    stays raw); the details say so, with the fitting set's ECE before and after.
    """
    maps: dict[str, Any] = {}
    info: dict[str, Any] = dict(details or {})
    for kind in KINDS:
        p, y = pairs(records, kind) or ([], [])
        try:
            maps[kind] = fit(p, y, method)
        except ValueError as exc:
            maps[kind] = None
            info[f"{kind}_not_fitted"] = str(exc)
            continue
        info[f"{kind}_fit"] = {"n": len(p), "positives": int(sum(y)),
                               "ece_before": round(ece(p, y), 4),
                               "ece_after": round(ece(maps[kind].apply(p), y), 4)}
    if maps["patient"] is None and maps["lesion"] is None:
        raise ValueError("nothing to calibrate: " + "; ".join(
            str(info[k]) for k in ("patient_not_fitted", "lesion_not_fitted")))
    return CalibrationEntry(patient=maps["patient"], lesion=maps["lesion"],
                            fitted_on=fitted_on, details=info)
