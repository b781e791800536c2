"""PANORAMA-style metrics with bootstrap intervals, computed from per-case records.

Patient level: AUROC of the patient score (positive = PDAC). Lesion level:
each candidate is a true positive when its IoU with a reference lesion is at
least ``iou`` (0.15 here, as the issue asks; picai_eval's default is 0.1),
average precision over all candidates, and the FROC curve (sensitivity
against false positives per volume). Sensitivity by lesion size is read at the
operating point with at most one false positive per volume.

Beyond lesions (issue 16): the stage-1 pancreas is scored as a segmentation
(Dice, and HD95 in mm on the source grid with its spacing) and as a
localisation (the *pancreas detection rate*: the fraction of cases with a
labelled pancreas whose predicted pancreas overlaps it, Dice > 0, the seed
article's lenient criterion; the stricter Dice >= 0.5 rate beside it), and
lesion sensitivity is broken down by where the reference lesion lies in the
gland (head / neck / body / tail), because a model can learn the head of one
generator's gland and miss its tail.

A case the pipeline declares *not assessable* is scored as what it gives the
reader: no lesion candidates and the lowest patient score, so a cancer in
such a case still counts as missed; the cases are counted and listed.

Every figure comes with a 95% interval from resampling *cases* (1000
replicates): lesions of one patient are not independent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "LOCATIONS",
    "LOWEST_SCORE",
    "SIZE_BINS",
    "CaseRecord",
    "average_precision",
    "bootstrap",
    "dice",
    "froc",
    "hd95_mm",
    "match_lesions",
    "roc_auc",
    "summarise",
]

SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<10mm", 0.0, 10.0), ("10-20mm", 10.0, 20.0), (">20mm", 20.0, float("inf")),
)
# The parts of the gland, in the order (and with the names) that
# pipelines.pancreas.measures.LOCATION_CUTS uses for the pipeline's own findings.
LOCATIONS: tuple[str, ...] = ("head", "neck", "body", "tail")
# The patient score a not-assessable case is given: below (or tied with) every
# assessed case, so it can never raise an AUROC by being declined.
LOWEST_SCORE = 0.0
NOT_ASSESSABLE_SCORING = (
    "A not-assessable case contributes no lesion candidates and counts with the lowest "
    f"patient score ({LOWEST_SCORE:g}, ties count half in the AUROC): its reference lesions "
    "count as missed and a cancer in it as not detected."
)
DETECTION_DEFINITION = (
    "pancreas detected = the stage-1 pancreas overlaps the labelled pancreas (labels 1 and 2) "
    "by at least one voxel (Dice > 0); over cases with a labelled pancreas"
)


@dataclass
class CaseRecord:
    case_id: str
    diagnosis: str  # normal | PDAC | PNET | IPMN | other_benign | lesion (type unknown)
    score: float  # patient score
    pancreas_found: bool
    cand_conf: list[float] = field(default_factory=list)
    cand_tp: list[bool] = field(default_factory=list)
    gt_size_mm: list[float] = field(default_factory=list)
    gt_hit_conf: list[float] = field(default_factory=list)  # 0 when never hit
    # Where each reference lesion lies in the labelled gland (LOCATIONS), "" when unknown.
    gt_location: list[str] = field(default_factory=list)
    assessable: bool = True
    reason: str | None = None  # why not assessable
    # Stage-1 pancreas against the label's pancreas; nan when undefined (no labelled
    # pancreas for Dice; an empty prediction or reference for HD95).
    dice: float = float("nan")
    hd95_mm: float = float("nan")
    # The scores before the model package's calibration, when it applied one (issue 20):
    # ``score`` and ``cand_conf`` are then the calibrated values a reader saw.
    raw_score: float | None = None
    raw_cand_conf: list[float] | None = None

    @property
    def max_conf(self) -> float:
        return max(self.cand_conf, default=0.0)

    @property
    def largest_mm(self) -> float:
        return max(self.gt_size_mm, default=0.0)


def match_lesions(
    gt: npt.NDArray[np.bool_], candidates: list[tuple[npt.NDArray[np.bool_], float]],
    iou: float = 0.15,
) -> tuple[list[npt.NDArray[np.bool_]], list[bool], list[float]]:
    """Reference lesions (26-connected components of ``gt``), the TP flag of every
    candidate and, per reference lesion, the highest confidence that hit it."""
    labels, n = ndimage.label(gt, structure=np.ones((3, 3, 3), bool))
    lesions = [labels == i for i in range(1, n + 1)]
    tp = [False] * len(candidates)
    hit = [0.0] * n
    for j, (mask, conf) in enumerate(candidates):
        for i, les in enumerate(lesions):
            inter = int(np.logical_and(mask, les).sum())
            if inter == 0:
                continue
            union = int(np.logical_or(mask, les).sum())
            if inter / union >= iou:
                tp[j] = True
                hit[i] = max(hit[i], conf)
    return lesions, tp, hit


def _surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The mask's boundary voxels (those with a face neighbour outside, or on the edge)."""
    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                   border_value=0)
    return mask & ~inner


def dice(pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_]) -> float:
    """Dice overlap; nan when both are empty (nothing to agree on)."""
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def hd95_mm(pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_],
            spacing_zyx: tuple[float, float, float], percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the two surfaces, in mm.

    The larger of the two directed figures (each surface voxel's distance to the
    nearest surface voxel of the other mask, 95th percentile), as MONAI's
    ``compute_hausdorff_distance(percentile=95)``. Computed on the bounding box of
    both masks plus one voxel, which gives the same distances as the whole grid
    (every surface voxel lies inside it) at a fraction of the memory of a
    512x512x300 distance transform. nan when either mask is empty.
    """
    if not pred.any() or not ref.any():
        return float("nan")
    idx = np.argwhere(pred | ref)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    p = np.pad(pred[box], 1)
    r = np.pad(ref[box], 1)
    # Padding with background keeps voxels on the grid's edge on the surface, as
    # binary_erosion(border_value=0) does on the whole grid.
    sp, sr = _surface(p), _surface(r)
    to_r = ndimage.distance_transform_edt(~sr, sampling=spacing_zyx)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    return float(max(np.percentile(to_r[sp], percentile), np.percentile(to_p[sr], percentile)))


def roc_auc(y: npt.NDArray[np.bool_], s: npt.NDArray[np.floating]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half)."""
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    cum = np.cumsum(counts)
    avg = cum - (counts - 1) / 2.0
    ranks[order] = avg[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def roc_curve(y: npt.NDArray[np.bool_], s: npt.NDArray[np.floating]) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    thr = np.unique(s)[::-1]
    tpr = [0.0] + [float((s[y] >= t).mean()) if y.any() else 0.0 for t in thr]
    fpr = [0.0] + [float((s[~y] >= t).mean()) if (~y).any() else 0.0 for t in thr]
    return np.array(fpr), np.array(tpr)


def average_precision(conf: npt.NDArray[np.floating], tp: npt.NDArray[np.bool_],
                      n_gt: int) -> float:
    """Area under the precision-recall curve of the candidates (all-point interpolation)."""
    if n_gt == 0:
        return float("nan")
    if len(conf) == 0:
        return 0.0
    order = np.argsort(-conf, kind="mergesort")
    t = tp[order].astype(float)
    ctp = np.cumsum(t)
    prec = ctp / np.arange(1, len(t) + 1)
    rec = np.minimum(ctp / n_gt, 1.0)
    prec = np.maximum.accumulate(prec[::-1])[::-1]  # precision envelope
    r_prev = np.concatenate([[0.0], rec[:-1]])
    return float(np.sum((rec - r_prev) * prec))


def froc(records: list[CaseRecord]) -> tuple[npt.NDArray, npt.NDArray, npt.NDArray]:
    """Thresholds, false positives per volume and lesion sensitivity at each."""
    fp_conf = np.array([c for r in records for c, t in zip(r.cand_conf, r.cand_tp, strict=True)
                        if not t])
    hit = np.array([h for r in records for h in r.gt_hit_conf])
    thr = np.unique(np.concatenate([fp_conf, hit[hit > 0], [np.inf]]))[::-1]
    n = max(len(records), 1)
    fpv = np.array([(fp_conf >= t).sum() / n for t in thr])
    sens = np.array([(hit >= t).mean() if len(hit) else np.nan for t in thr])
    return thr, fpv, sens


def operating_threshold(records: list[CaseRecord], max_fp_per_volume: float = 1.0) -> float:
    """The lowest candidate threshold that keeps false positives at or below the limit."""
    thr, fpv, _ = froc(records)
    ok = thr[(fpv <= max_fp_per_volume) & (thr > 0)]
    return float(ok.min()) if len(ok) else float("inf")


def _binary(y: npt.NDArray[np.bool_], s: npt.NDArray[np.floating], thr: float) -> dict[str, float]:
    pred = s >= thr
    tp = float((pred & y).sum())
    tn = float((~pred & ~y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    nan = float("nan")
    sens = tp / (tp + fn) if tp + fn else nan
    spec = tn / (tn + fp) if tn + fp else nan
    prec = tp / (tp + fp) if tp + fp else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {
        "accuracy": (tp + tn) / max(len(y), 1), "sensitivity": sens, "specificity": spec,
        "precision": prec, "f1": f1, "auc": roc_auc(y, s),
    }


def _lesion_metrics(recs: list[CaseRecord], thr: float | None = None) -> dict[str, float]:
    conf = np.array([c for r in recs for c in r.cand_conf])
    tp = np.array([t for r in recs for t in r.cand_tp], dtype=bool)
    sizes = np.array([s for r in recs for s in r.gt_size_mm])
    hit = np.array([h for r in recs for h in r.gt_hit_conf])
    where = np.array([loc for r in recs for loc in _locations(r)], dtype=str)
    t = operating_threshold(recs) if thr is None else thr
    out = {
        "ap": average_precision(conf, tp, len(sizes)),
        "threshold": t,
        "fp_per_volume": float(((conf >= t) & ~tp).sum() / max(len(recs), 1)),
        "sensitivity": float((hit >= t).mean()) if len(hit) else float("nan"),
        "sensitivity_ge10mm": float((hit[sizes >= 10] >= t).mean())
        if (sizes >= 10).any() else float("nan"),
    }
    for name, lo, hi in SIZE_BINS:
        sel = (sizes >= lo) & (sizes < hi)
        out[f"sens_{name}"] = float((hit[sel] >= t).mean()) if sel.any() else float("nan")
    for loc in LOCATIONS:
        sel = where == loc
        out[f"sens_loc_{loc}"] = float((hit[sel] >= t).mean()) if sel.any() else float("nan")
    return out


def _locations(r: CaseRecord) -> list[str]:
    """One location per reference lesion ("" where the record carries none)."""
    return [*r.gt_location, *[""] * (len(r.gt_hit_conf) - len(r.gt_location))][
        : len(r.gt_hit_conf)]


def _segmentation(recs: list[CaseRecord]) -> dict[str, float]:
    """Mean and median Dice and HD95 of the stage-1 pancreas, and the detection rates.

    Dice is over cases with a labelled pancreas (a missing prediction is Dice 0);
    HD95 over cases where both masks exist (the cases where it is undefined are
    counted in the summary, not hidden: the detection rate covers them).
    """
    nan = float("nan")
    d = np.array([r.dice for r in recs], dtype=float)
    d = d[np.isfinite(d)]
    h = np.array([r.hd95_mm for r in recs], dtype=float)
    h = h[np.isfinite(h)]
    # A declined case may carry no mask (the reader gets none): Dice 0 above; the
    # assessed-only mean says how good stage 1 is where the node does report.
    da = np.array([r.dice for r in recs if r.assessable], dtype=float)
    da = da[np.isfinite(da)]
    return {
        "dice_mean_assessed": float(da.mean()) if len(da) else nan,
        "dice_mean": float(d.mean()) if len(d) else nan,
        "dice_median": float(np.median(d)) if len(d) else nan,
        "hd95_mean": float(h.mean()) if len(h) else nan,
        "hd95_median": float(np.median(h)) if len(h) else nan,
        "detection_rate": float((d > 0).mean()) if len(d) else nan,
        "dice_ge_050_rate": float((d >= 0.5).mean()) if len(d) else nan,
    }


def _table(recs: list[CaseRecord], threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """The seed paper's table: overall, by lesion size and by tumour type."""
    dx = np.array([r.diagnosis for r in recs])
    score = np.array([r.score for r in recs])
    det = np.array([r.max_conf for r in recs])
    largest = np.array([r.largest_mm for r in recs])
    normal = dx == "normal"
    rows: dict[str, dict[str, float]] = {}
    rows["PDAC vs rest (patient score)"] = _binary(dx == "PDAC", score, threshold)
    rows["lesion vs normal (detection)"] = _binary(~normal, det, threshold)
    for name, lo, hi in SIZE_BINS:
        sel = normal | ((largest >= lo) & (largest < hi) & ~normal)
        rows[f"size {name} vs normal"] = _binary(~normal[sel], det[sel], threshold)
    for t in ("PDAC", "PNET", "IPMN", "other_benign"):
        sel = normal | (dx == t)
        if (dx == t).any():
            rows[f"{t} vs normal"] = _binary(~normal[sel], det[sel], threshold)
    return rows


def _point(recs: list[CaseRecord]) -> dict[str, Any]:
    dx = np.array([r.diagnosis for r in recs])
    score = np.array([r.score for r in recs])
    y_pdac = (dx == "PDAC") if (dx == "PDAC").any() else (dx != "normal")
    return {
        "patient_auroc": roc_auc(y_pdac, score),
        "patient_auroc_any_lesion": roc_auc(dx != "normal", score),
        "lesion": _lesion_metrics(recs),
        "segmentation": _segmentation(recs),
        "table": _table(recs),
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "|"))
        else:
            out[key] = float(v)
    return out


def bootstrap(recs: list[CaseRecord], fn: Callable[[list[CaseRecord]], dict[str, Any]],
              n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of every figure ``fn`` returns, resampling cases."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(recs), len(recs))
        for k, v in _flatten(fn([recs[i] for i in idx])).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, vals in samples.items():
        a = np.array(vals, dtype=float)
        a = a[np.isfinite(a)]
        out[k] = (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))) if len(a) \
            else (float("nan"), float("nan"))
    return out


def _fig(value: float, ci: tuple[float, float]) -> dict[str, Any]:
    def r(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 4)

    return {"value": r(value), "ci95": [r(ci[0]), r(ci[1])]}


def summarise(recs: list[CaseRecord], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json content: every figure as {value, ci95}."""
    point = _flatten(_point(recs))
    ci = bootstrap(recs, _point, n=n_boot, seed=seed)

    def fig(key: str) -> dict[str, Any]:
        return _fig(point.get(key, float("nan")), ci.get(key, (float("nan"), float("nan"))))

    table: dict[str, dict[str, Any]] = {}
    for key in point:
        if key.startswith("table|"):
            _, row, metric = key.split("|")
            table.setdefault(row, {})[metric] = fig(key)
    dx = [r.diagnosis for r in recs]
    where = [loc for r in recs for loc in _locations(r)]
    declined = [r for r in recs if not r.assessable]
    declined_dx = [r.diagnosis for r in declined]
    with_pancreas = sum(1 for r in recs if np.isfinite(r.dice))
    hd_defined = sum(1 for r in recs if np.isfinite(r.hd95_mm))
    return {
        "n_cases": len(recs),
        "case_mix": {d: dx.count(d) for d in sorted(set(dx))},
        "n_lesions": sum(len(r.gt_size_mm) for r in recs),
        "bootstrap_replicates": n_boot,
        "patient": {
            "auroc": fig("patient_auroc"),
            "auroc_any_lesion": fig("patient_auroc_any_lesion"),
            "positive": "PDAC",
        },
        "lesion": {
            "ap": fig("lesion|ap"),
            "iou_threshold": 0.15,
            "operating_point": "lowest threshold with <= 1 false positive per volume",
            # None when no threshold reports anything within the limit (no candidates at
            # all, e.g. every case declined): strict JSON has no Infinity.
            "threshold": round(point["lesion|threshold"], 4)
            if np.isfinite(point["lesion|threshold"]) else None,
            "fp_per_volume": fig("lesion|fp_per_volume"),
            "sensitivity": fig("lesion|sensitivity"),
            "sensitivity_ge10mm": fig("lesion|sensitivity_ge10mm"),
            "sensitivity_by_size": {name: fig(f"lesion|sens_{name}") for name, _, _ in SIZE_BINS},
            "sensitivity_by_location": {
                loc: {**fig(f"lesion|sens_loc_{loc}"), "n": where.count(loc)}
                for loc in LOCATIONS},
            "location_unknown": where.count(""),
        },
        "segmentation": {
            "structure": "pancreas (stage 1) vs label > 0 (gland including its lesion)",
            "n_cases_with_pancreas": with_pancreas,
            "n_hd95_defined": hd_defined,
            "hd95_note": "HD95 over cases where both the predicted and the labelled pancreas "
                         "exist; the others are counted by the detection rate",
            "dice_mean": fig("segmentation|dice_mean"),
            "dice_median": fig("segmentation|dice_median"),
            "dice_mean_assessed": fig("segmentation|dice_mean_assessed"),
            "dice_note": "a case without a predicted pancreas (not found, or declined with "
                         "no mask) counts Dice 0; dice_mean_assessed is over assessed cases",
            "hd95_mm_mean": fig("segmentation|hd95_mean"),
            "hd95_mm_median": fig("segmentation|hd95_median"),
            "detection_rate": fig("segmentation|detection_rate"),
            "detection_definition": DETECTION_DEFINITION,
            "dice_ge_050_rate": fig("segmentation|dice_ge_050_rate"),
        },
        "not_assessable": {
            "n": len(declined),
            "by_diagnosis": {d: declined_dx.count(d) for d in sorted(set(declined_dx))},
            "cases": [{"case_id": r.case_id, "diagnosis": r.diagnosis, "reason": r.reason}
                      for r in declined],
            "scoring": NOT_ASSESSABLE_SCORING,
        },
        "table": table,
    }
