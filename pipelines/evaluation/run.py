"""``ainode evaluate``: run the node's own pipeline on a labelled folder and score it.

The cases go through ``PancreasPipeline.report`` (what ``run`` turns into the
generic result for a DICOM series) on a SimpleITK image with the source
geometry, so the figures describe the code that runs in the hospital, not a
separate evaluation path; the report keeps the pancreas terms that are scored
(patient score, "pancreas found", lesion masks and confidences).
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

from pipelines.evaluation.metrics import (
    SIZE_BINS,
    CaseRecord,
    froc,
    match_lesions,
    roc_curve,
    summarise,
)
from pipelines.pancreas.measures import long_axis_diameter_mm
from pipelines.training.data import find_cases, read_case

log = logging.getLogger(__name__)

__all__ = ["evaluate", "markdown_table"]


def evaluate(
    data: Path,
    out: Path,
    pipeline: Any,
    *,
    n_boot: int = 1000,
    max_cases: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cases = find_cases(data)[:max_cases]
    records: list[CaseRecord] = []
    t0 = time.monotonic()
    for i, case in enumerate(cases, 1):
        img, lab = read_case(case)
        res = pipeline.report(img)
        gt = sitk.GetArrayFromImage(lab) == 2
        cands = [(les.mask, float(les.confidence)) for les in res.lesions]
        lesions, tp, hit = match_lesions(gt, cands)
        sp = tuple(float(s) for s in img.GetSpacing())
        diagnosis = case.diagnosis or ("lesion" if gt.any() else "normal")
        records.append(CaseRecord(
            case_id=case.case_id, diagnosis=diagnosis, score=float(res.patient_score),
            pancreas_found=res.pancreas_found, cand_conf=[c for _, c in cands], cand_tp=tp,
            gt_size_mm=[long_axis_diameter_mm(m, sp) for m in lesions],  # type: ignore[arg-type]
            gt_hit_conf=hit,
        ))
        if progress:
            r = records[-1]
            progress(f"[{i}/{len(cases)}] {case.case_id} {diagnosis:<12} score={r.score:.3f} "
                     f"candidates={len(cands)} tp={sum(tp)} gt={len(lesions)} "
                     f"({time.monotonic() - t0:.0f}s)")
    metrics = summarise(records, n_boot=n_boot)
    metrics["pipeline"] = getattr(pipeline, "name", "?")
    metrics["models"] = pipeline.model_version() if hasattr(pipeline, "model_version") else "?"
    metrics["data"] = str(data)
    metrics["seconds"] = round(time.monotonic() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(markdown_table(metrics))
    _write_cases(out / "cases.csv", records)
    _plots(out, records)
    return metrics


def _write_cases(path: Path, records: list[CaseRecord]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "diagnosis", "score", "pancreas_found", "candidates",
                    "max_confidence", "true_positives", "lesions", "lesion_sizes_mm"])
        for r in records:
            w.writerow([r.case_id, r.diagnosis, f"{r.score:.4f}", r.pancreas_found,
                        len(r.cand_conf), f"{r.max_conf:.4f}", sum(r.cand_tp),
                        len(r.gt_size_mm), ";".join(f"{s:.1f}" for s in r.gt_size_mm)])


def _fmt(f: dict[str, Any]) -> str:
    v, ci = f.get("value"), f.get("ci95", [None, None])
    if v is None:
        return "n/a"
    lo, hi = ci
    return f"{v:.3f} ({lo:.3f}–{hi:.3f})" if lo is not None else f"{v:.3f}"


def markdown_table(m: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation: {m.get('pipeline', '?')} on {m.get('data', '?')}",
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
        f"| Operating threshold (<= 1 FP/volume) | {m['lesion']['threshold']:.3f} |",
        f"| False positives per volume | {_fmt(m['lesion']['fp_per_volume'])} |",
        f"| Lesion sensitivity | {_fmt(m['lesion']['sensitivity'])} |",
        f"| Lesion sensitivity >= 10 mm | {_fmt(m['lesion']['sensitivity_ge10mm'])} |",
    ]
    for name, _, _ in SIZE_BINS:
        lines.append(f"| Lesion sensitivity {name} | "
                     f"{_fmt(m['lesion']['sensitivity_by_size'][name])} |")
    lines += ["", "| Group (threshold 0.5) | Accuracy | Sensitivity | Specificity | Precision "
              "| F1 | AUC |", "|---|---|---|---|---|---|---|"]
    for row, vals in m["table"].items():
        cells = [_fmt(vals[k]) for k in ("accuracy", "sensitivity", "specificity", "precision",
                                         "f1", "auc")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
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
