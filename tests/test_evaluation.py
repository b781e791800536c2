"""Evaluation metrics on hand-made records with known answers, and the files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluation.metrics import (
    CaseRecord,
    average_precision,
    froc,
    match_lesions,
    operating_threshold,
    roc_auc,
    summarise,
)


def test_auroc_known_values() -> None:
    y = np.array([True, True, False, False])
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(y, np.array([0.9, 0.3, 0.5, 0.1])) == 0.75


def test_average_precision_known_value() -> None:
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    tp = np.array([True, False, True, False])
    # recall 0.5 at precision 1, recall 1.0 at precision 2/3 (3 reference lesions: 2/3 max)
    assert average_precision(conf, tp, 2) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(conf, tp, 3) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    assert average_precision(np.array([]), np.array([], bool), 2) == 0.0


def test_match_uses_iou_015() -> None:
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    hit = np.zeros_like(gt)
    hit[2:6, 2:6, 2:4] = True  # IoU 0.5
    weak = np.zeros_like(gt)
    weak[2:3, 2:4, 2:6] = True  # 8 voxels inside: IoU 0.125 < 0.15
    lesions, tp, conf = match_lesions(gt, [(weak, 0.9), (hit, 0.6)])
    assert len(lesions) == 1
    assert tp == [False, True]
    assert conf == [0.6]


def _records() -> list[CaseRecord]:
    recs = []
    for i in range(10):  # PDAC, all detected at 0.9, one FP at 0.3 each
        recs.append(CaseRecord(f"p{i}", "PDAC", 0.8 + i * 0.01, True, [0.9, 0.3],
                               [True, False], [8.0 + 3 * i], [0.9]))
    for i in range(10):
        recs.append(CaseRecord(f"n{i}", "normal", 0.1 + i * 0.01, True, [0.2], [False], [], []))
    return recs


def test_froc_and_operating_point() -> None:
    recs = _records()
    thr, fpv, sens = froc(recs)
    assert fpv[-1] == pytest.approx(1.0)  # 10 + 10 FPs over 20 volumes at the lowest threshold
    assert operating_threshold(recs, 1.0) == pytest.approx(0.2)
    assert operating_threshold(recs, 0.5) == pytest.approx(0.3)  # 10 FPs / 20 volumes
    assert sens[thr == 0.9][0] == 1.0


def test_summary_has_the_required_keys_and_intervals() -> None:
    m = summarise(_records(), n_boot=50)
    assert m["patient"]["auroc"]["value"] == 1.0
    assert m["lesion"]["ap"]["value"] == pytest.approx(1.0)
    assert m["lesion"]["fp_per_volume"]["value"] == pytest.approx(1.0)
    for key in ("<10mm", "10-20mm", ">20mm"):
        fig = m["lesion"]["sensitivity_by_size"][key]
        assert set(fig) == {"value", "ci95"}
        assert fig["value"] == 1.0
    row = m["table"]["PDAC vs rest (patient score)"]
    assert set(row) == {"accuracy", "sensitivity", "specificity", "precision", "f1", "auc"}
    lo, hi = row["accuracy"]["ci95"]
    assert lo <= row["accuracy"]["value"] <= hi
    json.dumps(m)


def test_evaluate_writes_metrics_table_and_plots(tmp_path: Path) -> None:
    from pipelines.evaluation.run import evaluate
    from pipelines.pancreas import build_pipeline
    from pipelines.phantom import write_dataset

    shipped = Path(__file__).resolve().parents[1] / "pipelines" / "weights"
    # The demo weights are committed: their absence is a failure, not a skip.
    assert (shipped / "pancreas-ct-stage1" / "model.yaml").exists(), "demo weights missing"
    data = tmp_path / "data"
    write_dataset(data, [990001, 990002, 990003], images="imagesTs", labels="labelsTs")
    m = evaluate(data, tmp_path / "out", build_pipeline("pancreas-ct", device="cpu"), n_boot=20)
    for f in ("metrics.json", "metrics.md", "roc.png", "froc.png", "cases.csv"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["n_cases"] == 3
    assert {"auroc"} <= set(saved["patient"])
    assert {"ap", "fp_per_volume", "sensitivity_by_size"} <= set(saved["lesion"])
    assert (tmp_path / "out" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert m["pipeline"] == "pancreas-ct"
