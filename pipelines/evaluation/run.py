"""``ainode evaluate``: run the node's own pipeline on a labelled folder and score it.

The cases go through ``PancreasPipeline.report`` (what ``run`` turns into the
generic result for a DICOM series) on a SimpleITK image with the source
geometry, so the figures describe the code that runs in the hospital, not a
separate evaluation path; the report keeps the pancreas terms that are scored
(patient score, "pancreas found", lesion masks and confidences, the stage-1
pancreas mask).

Whether a case was assessed is read from the generic result's status, the one
place every pipeline states it, so a new applicability rule in the pipeline is
scored here without a change: a declined case keeps no candidates and the
lowest score (see :data:`pipelines.evaluation.metrics.NOT_ASSESSABLE_SCORING`).
The reference lesion's part of the gland is computed from the label with the
pipeline's own ``pancreas_location``, so "sensitivity in the tail" means the
tail the way a finding's SR would name it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813

from pipelines.evaluation.calibration import calibration_lines, calibration_metrics
from pipelines.evaluation.metrics import (
    LOCATIONS,
    LOWEST_SCORE,
    SIZE_BINS,
    CaseRecord,
    dice,
    froc,
    hd95_mm,
    match_lesions,
    roc_curve,
    summarise,
)
from pipelines.models.package import QA_REFERENCE_FILE
from pipelines.pancreas.measures import (
    centroid_lps,
    long_axis_diameter_mm,
    pancreas_location,
    voxel_to_lps,
)
from pipelines.training.data import find_cases, read_case

log = logging.getLogger(__name__)

__all__ = ["assessment", "compare_table", "evaluate", "markdown_table", "record_case",
           "reference_locations", "run_cases"]


def assessment(report: Any) -> tuple[bool, str | None]:
    """(assessed, reason) as the pipeline states it in the generic result.

    ``to_result`` is what the node sends to PACS, so a case counts as declined
    exactly when the reader would have been told "not assessable". A report
    without ``to_result`` (a stand-in) falls back on "pancreas found".
    """
    to_result = getattr(report, "to_result", None)
    if callable(to_result):
        result = to_result()
        return result.status == "assessed", result.reason
    found = bool(getattr(report, "pancreas_found", True))
    return found, None if found else "pancreas not found"


def reference_locations(lesions: list[np.ndarray], gland: np.ndarray,
                        img: sitk.Image) -> list[str]:
    """Head / neck / body / tail of each reference lesion in the labelled gland ("" if
    the gland is too small to have an axis), by the pipeline's own rule."""
    if not lesions:
        return []
    sx, sy, sz = (float(v) for v in img.GetSpacing())
    ox, oy, oz = (float(v) for v in img.GetOrigin())
    spacing, origin = (sx, sy, sz), (ox, oy, oz)
    direction = tuple(float(v) for v in img.GetDirection())
    gland_lps = voxel_to_lps(np.argwhere(gland).astype(np.float64), spacing,
                             origin, direction)
    if len(gland_lps) <= 3:
        return [""] * len(lesions)
    return [str(pancreas_location(centroid_lps(m, spacing, origin, direction),
                                  gland_lps)) for m in lesions]


def record_case(case_id: str, diagnosis: str | None, img: sitk.Image, lab: sitk.Image,
                report: Any) -> CaseRecord:
    """Score one case's report against its label (1 = pancreas, 2 = lesion in it)."""
    arr = sitk.GetArrayFromImage(lab)
    gt, gland = arr == 2, arr > 0
    assessed, reason = assessment(report)
    cands = [(les.mask, float(les.confidence)) for les in report.lesions] if assessed else []
    raw_score = getattr(report, "raw_patient_score", None)
    raw_conf = [float(les.raw_confidence) for les in report.lesions
                if getattr(les, "raw_confidence", None) is not None] if assessed else []
    lesions, tp, hit = match_lesions(gt, cands)
    sp = tuple(float(s) for s in img.GetSpacing())
    pred = getattr(report, "pancreas_mask", None)
    if pred is None:
        pred = np.zeros(gland.shape, bool)
    elif pred.shape != gland.shape:
        raise ValueError(f"{case_id}: pancreas mask {pred.shape} is not on the label's grid "
                         f"{gland.shape}")
    pred = np.asarray(pred, bool)
    return CaseRecord(
        case_id=case_id, diagnosis=diagnosis or ("lesion" if gt.any() else "normal"),
        score=float(report.patient_score) if assessed else LOWEST_SCORE,
        pancreas_found=bool(getattr(report, "pancreas_found", pred.any())),
        cand_conf=[c for _, c in cands], cand_tp=tp,
        gt_size_mm=[long_axis_diameter_mm(m, sp) for m in lesions],  # type: ignore[arg-type]
        gt_hit_conf=hit, gt_location=reference_locations(lesions, gland, img),
        assessable=assessed, reason=None if assessed else (reason or "not assessable"),
        dice=dice(pred, gland) if gland.any() else float("nan"),
        hd95_mm=hd95_mm(pred, gland, (sp[2], sp[1], sp[0])),
        raw_score=float(raw_score) if assessed and raw_score is not None else None,
        raw_cand_conf=raw_conf if len(raw_conf) == len(cands) and raw_conf else None,
    )


def run_cases(data: Path, pipeline: Any, *, max_cases: int | None = None,
              progress: Callable[[str], None] | None = None,
              quality: list[dict[str, Any]] | None = None) -> list[CaseRecord]:
    """``pipeline.report`` on every case of ``data``, each scored against its label.

    The one loop of ``ainode evaluate`` and ``ainode calibrate``, so a
    calibration is fitted on exactly the scores an evaluation measures. When
    ``quality`` is a list, each case's quality record (the one a job keeps,
    :meth:`pipelines.results.QualityRecord.as_record`) is appended to it: the
    drift reference of the model package.
    """
    cases = find_cases(data)[:max_cases]
    records: list[CaseRecord] = []
    t0 = time.monotonic()
    for i, case in enumerate(cases, 1):
        img, lab = read_case(case)
        report = pipeline.report(img)
        records.append(record_case(case.case_id, case.diagnosis, img, lab, report))
        if quality is not None and callable(getattr(report, "quality", None)):
            quality.append(report.quality().as_record(case.case_id))
        if progress:
            r = records[-1]
            state = "" if r.assessable else f" NOT ASSESSABLE ({r.reason})"
            progress(f"[{i}/{len(cases)}] {case.case_id} {r.diagnosis:<12} score={r.score:.3f} "
                     f"candidates={len(r.cand_conf)} tp={sum(r.cand_tp)} "
                     f"gt={len(r.gt_size_mm)} dice={r.dice:.2f}{state} "
                     f"({time.monotonic() - t0:.0f}s)")
    return records


def evaluate(
    data: Path,
    out: Path,
    pipeline: Any,
    *,
    n_boot: int = 1000,
    max_cases: int | None = None,
    progress: Callable[[str], None] | None = None,
    set_name: str | None = None,
) -> dict[str, Any]:
    """Run ``pipeline.report`` on every case of ``data``, score it, write the files.

    ``set_name`` names where the data came from ("generator-v1 fresh",
    "randomised-appearance", ...) so figures from different sources are never
    read as one; it is written into metrics.json and metrics.md.
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    quality: list[dict[str, Any]] = []
    records = run_cases(data, pipeline, max_cases=max_cases, progress=progress,
                        quality=quality)
    metrics = summarise(records, n_boot=n_boot)
    metrics["calibration"] = calibration_metrics(records, out)
    metrics["set_name"] = set_name
    metrics["pipeline"] = getattr(pipeline, "name", "?")
    metrics["models"] = pipeline.model_version() if hasattr(pipeline, "model_version") else "?"
    metrics["data"] = str(data)
    metrics["seconds"] = round(time.monotonic() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(markdown_table(metrics))
    _write_cases(out / "cases.csv", records)
    # The drift reference (``ainode evaluate --write-reference`` stores it in the package).
    (out / QA_REFERENCE_FILE).write_text(json.dumps(quality, separators=(",", ":")))
    _plots(out, records)
    return metrics


def _write_cases(path: Path, records: list[CaseRecord]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "diagnosis", "score", "pancreas_found", "candidates",
                    "max_confidence", "true_positives", "lesions", "lesion_sizes_mm",
                    "lesion_locations", "assessable", "reason", "pancreas_dice",
                    "pancreas_hd95_mm"])
        for r in records:
            w.writerow([r.case_id, r.diagnosis, f"{r.score:.4f}", r.pancreas_found,
                        len(r.cand_conf), f"{r.max_conf:.4f}", sum(r.cand_tp),
                        len(r.gt_size_mm), ";".join(f"{s:.1f}" for s in r.gt_size_mm),
                        ";".join(r.gt_location), r.assessable, r.reason or "",
                        _num(r.dice), _num(r.hd95_mm)])


def _num(x: float) -> str:
    return f"{x:.4f}" if np.isfinite(x) else ""


def _fmt(f: dict[str, Any]) -> str:
    v, ci = f.get("value"), f.get("ci95", [None, None])
    if v is None:
        return "n/a"
    lo, hi = ci
    return f"{v:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None else f"{v:.3f}"


def _thr(t: float | None) -> str:
    return "n/a (no candidate)" if t is None or not np.isfinite(t) else f"{t:.3f}"


def markdown_table(m: dict[str, Any]) -> str:
    name = m.get("set_name")
    where = f"test set \"{name}\" ({m.get('data', '?')})" if name else m.get("data", "?")
    lines = [
        f"# Evaluation: {m.get('pipeline', '?')} on {where}",
        "",
        f"{m['n_cases']} cases ({', '.join(f'{k} {v}' for k, v in m['case_mix'].items())}), "
        f"{m['n_lesions']} reference lesions; 95% intervals from "
        f"{m['bootstrap_replicates']} bootstrap replicates over cases.",
        "",
        "| PANORAMA metric | value (95% CI) |",
        "|---|---|",
        f"| Patient AUROC (PDAC) | {_fmt(m['patient']['auroc'])} |",
        f"| Patient AUROC (any lesion) | {_fmt(m['patient']['auroc_any_lesion'])} |",
        f"| Lesion AP (IoU >= 0.15) | {_fmt(m['lesion']['ap'])} |",
        f"| Operating threshold (<= 1 FP/volume) | {_thr(m['lesion']['threshold'])} |",
        f"| False positives per volume | {_fmt(m['lesion']['fp_per_volume'])} |",
        f"| Lesion sensitivity | {_fmt(m['lesion']['sensitivity'])} |",
        f"| Lesion sensitivity >= 10 mm | {_fmt(m['lesion']['sensitivity_ge10mm'])} |",
    ]
    for size, _, _ in SIZE_BINS:
        lines.append(f"| Lesion sensitivity {size} | "
                     f"{_fmt(m['lesion']['sensitivity_by_size'][size])} |")
    lines += _location_lines(m) + _segmentation_lines(m) + _declined_lines(m)
    lines += calibration_lines(m)
    lines += ["", "| Group (threshold 0.5) | Accuracy | Sensitivity | Specificity | Precision "
              "| F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for row, vals in m["table"].items():
        cells = [_fmt(vals[k]) for k in ("accuracy", "sensitivity", "specificity", "precision",
                                         "f1", "auc")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _location_lines(m: dict[str, Any]) -> list[str]:
    by = m["lesion"].get("sensitivity_by_location")
    if not by:
        return []
    lines = ["", "Lesion sensitivity by the reference lesion's part of the gland (position "
             "along the labelled gland's principal axis, as the pipeline locates its findings), "
             "at the same operating threshold; false positives are per volume, so only "
             "sensitivity is split.", "", "| Location | Lesions | Sensitivity (95% CI) |",
             "|---|---|---|"]
    for loc in LOCATIONS:
        lines.append(f"| {loc} | {by[loc]['n']} | {_fmt(by[loc])} |")
    if m["lesion"].get("location_unknown"):
        lines.append(f"| unknown | {m['lesion']['location_unknown']} | |")
    return lines


def _segmentation_lines(m: dict[str, Any]) -> list[str]:
    seg = m.get("segmentation")
    if not seg:
        return []
    return [
        "", f"Stage-1 pancreas against the label's pancreas ({seg['n_cases_with_pancreas']} "
        f"cases with a labelled pancreas; HD95 on the {seg['n_hd95_defined']} cases where both "
        "masks exist, in mm on the source grid; a case with no predicted pancreas, not found "
        "or declined without a mask, counts Dice 0). "
        f"Detection: {seg['detection_definition']}.", "",
        "| Pancreas segmentation | value (95% CI) |", "|---|---|",
        f"| Dice, mean | {_fmt(seg['dice_mean'])} |",
        f"| Dice, median | {_fmt(seg['dice_median'])} |",
        f"| Dice, mean over assessed cases | {_fmt(seg['dice_mean_assessed'])} |",
        f"| HD95 mm, mean | {_fmt(seg['hd95_mm_mean'])} |",
        f"| HD95 mm, median | {_fmt(seg['hd95_mm_median'])} |",
        f"| Pancreas detection rate (Dice > 0) | {_fmt(seg['detection_rate'])} |",
        f"| Cases with Dice >= 0.5 | {_fmt(seg['dice_ge_050_rate'])} |",
    ]


def _declined_lines(m: dict[str, Any]) -> list[str]:
    na = m.get("not_assessable")
    if na is None:
        return []
    mix = ", ".join(f"{k} {v}" for k, v in na["by_diagnosis"].items()) or "none"
    lines = ["", f"Not assessable: {na['n']} of {m['n_cases']} cases ({mix}). {na['scoring']}"]
    if na["cases"]:
        lines += ["", "| Case | Diagnosis | Reason |", "|---|---|---|"]
        lines += [f"| {c['case_id']} | {c['diagnosis']} | {c['reason']} |" for c in na["cases"]]
    return lines


# (label, path into metrics.json) of the rows ``compare_table`` shows.
_COMPARE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Cases", ("n_cases",)),
    ("Reference lesions", ("n_lesions",)),
    ("Not assessable", ("not_assessable", "n")),
    ("Patient AUROC (PDAC)", ("patient", "auroc")),
    ("Patient AUROC (any lesion)", ("patient", "auroc_any_lesion")),
    ("Lesion AP (IoU >= 0.15)", ("lesion", "ap")),
    ("Operating threshold (<= 1 FP/volume)", ("lesion", "threshold")),
    ("False positives per volume", ("lesion", "fp_per_volume")),
    ("Lesion sensitivity", ("lesion", "sensitivity")),
    ("Lesion sensitivity >= 10 mm", ("lesion", "sensitivity_ge10mm")),
    *((f"Lesion sensitivity {s}", ("lesion", "sensitivity_by_size", s)) for s, _, _ in SIZE_BINS),
    *((f"Lesion sensitivity, {loc}", ("lesion", "sensitivity_by_location", loc))
      for loc in LOCATIONS),
    ("Pancreas Dice, mean", ("segmentation", "dice_mean")),
    ("Pancreas Dice, median", ("segmentation", "dice_median")),
    ("Pancreas Dice, mean over assessed cases", ("segmentation", "dice_mean_assessed")),
    ("Pancreas HD95 mm, mean", ("segmentation", "hd95_mm_mean")),
    ("Pancreas HD95 mm, median", ("segmentation", "hd95_mm_median")),
    ("Pancreas detection rate (Dice > 0)", ("segmentation", "detection_rate")),
    ("Cases with pancreas Dice >= 0.5", ("segmentation", "dice_ge_050_rate")),
    ("ECE, patient-level probability", ("calibration", "patient", "ece")),
    ("ECE, lesion confidence", ("calibration", "lesion", "ece")),
)


def _cell(m: dict[str, Any], path: tuple[str, ...]) -> str:
    v: Any = m
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return "—"  # an older metrics.json without this figure
        v = v[k]
    if isinstance(v, dict):
        text = _fmt(v)
        return f"{text} [n={v['n']}]" if "n" in v else text
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def compare_table(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> str:
    """Two metrics.json side by side as one markdown table, so the figures of two test
    sets (or two model versions) are read against each other, never pooled."""
    head = [a.get("set_name") or names[0], b.get("set_name") or names[1]]
    lines = [f"| Metric | {head[0]} | {head[1]} |", "|---|---|---|",
             f"| Pipeline / models | {a.get('pipeline', '?')} {a.get('models', '')} | "
             f"{b.get('pipeline', '?')} {b.get('models', '')} |"]
    lines += [f"| {label} | {_cell(a, path)} | {_cell(b, path)} |"
              for label, path in _COMPARE_ROWS]
    return "\n".join(lines) + "\n"


def _plots(out: Path, records: list[CaseRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dx = np.array([r.diagnosis for r in records])
    score = np.array([r.score for r in records])
    y = (dx == "PDAC") if (dx == "PDAC").any() else (dx != "normal")
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if y.any() and (~y).any():
        fpr, tpr = roc_curve(y, score)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Patient-level ROC (PDAC)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    _, fpv, sens = froc(records)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpv, sens, lw=2, drawstyle="steps-post")
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set(xlabel="false positives per volume", ylabel="lesion sensitivity",
           title="Lesion-level FROC", xscale="symlog", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(out / "froc.png", dpi=100)
    plt.close(fig)
