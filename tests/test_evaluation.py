"""Evaluation metrics on hand-made records with known answers, and the files written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk  # noqa: N813

from pipelines.evaluation.metrics import (
    LOWEST_SCORE,
    CaseRecord,
    average_precision,
    dice,
    froc,
    hd95_mm,
    match_lesions,
    operating_threshold,
    roc_auc,
    summarise,
)
from pipelines.evaluation.run import compare_table, record_case, reference_locations
from pipelines.results import AlgorithmInfo, AnalysisResult


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
    m = evaluate(data, tmp_path / "out", build_pipeline("pancreas-ct", device="cpu"), n_boot=20,
                 set_name="generator-v1 e2e")
    for f in ("metrics.json", "metrics.md", "roc.png", "froc.png", "cases.csv"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["n_cases"] == 3
    assert {"auroc"} <= set(saved["patient"])
    assert {"ap", "fp_per_volume", "sensitivity_by_size"} <= set(saved["lesion"])
    assert (tmp_path / "out" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert m["pipeline"] == "pancreas-ct"
    # issue 16: the set's name, the pancreas as a segmentation, lesions by location
    assert saved["set_name"] == "generator-v1 e2e"
    assert "generator-v1 e2e" in (tmp_path / "out" / "metrics.md").read_text()
    seg = saved["segmentation"]
    assert seg["n_cases_with_pancreas"] == 3
    # the shipped stage 1 finds every phantom's gland (Dice 0.82-0.88 on fresh seeds)
    assert seg["detection_rate"]["value"] == 1.0
    assert seg["dice_mean"]["value"] > 0.5
    assert 0.0 < seg["hd95_mm_median"]["value"] < 30.0
    by_loc = saved["lesion"]["sensitivity_by_location"]
    assert set(by_loc) == {"head", "neck", "body", "tail"}
    assert sum(v["n"] for v in by_loc.values()) + saved["lesion"]["location_unknown"] == \
        saved["n_lesions"]
    assert saved["not_assessable"]["n"] == len(saved["not_assessable"]["cases"])
    # every phantom lesion lies in a gland with an axis, so each gets a part
    assert saved["lesion"]["location_unknown"] == 0


# --- issue 16: segmentation, detection, location, not assessable, named sets ----------


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], n: int) -> npt.NDArray[np.bool_]:
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + n, lo[1]:lo[1] + n, lo[2]:lo[2] + n] = True
    return m


def test_dice_and_hd95_of_a_shifted_cube() -> None:
    ref = _cube((30, 30, 30), (8, 8, 8), 10)
    spacing = (2.0, 1.0, 1.5)  # (z, y, x) mm
    along_x = _cube((30, 30, 30), (8, 8, 10), 10)  # 2 voxels along x = 3 mm
    assert dice(along_x, ref) == pytest.approx(0.8)  # 800 of 1000 voxels shared
    assert hd95_mm(along_x, ref, spacing) == pytest.approx(3.0)
    along_z = _cube((30, 30, 30), (11, 8, 8), 10)  # 3 slices of 2 mm = 6 mm
    assert hd95_mm(along_z, ref, spacing) == pytest.approx(6.0)
    assert dice(along_z, ref) == pytest.approx(0.7)
    assert hd95_mm(ref, ref, spacing) == 0.0 and dice(ref, ref) == 1.0
    # touching the edge of the grid: the edge is surface, as on an unbounded grid
    edge = _cube((12, 12, 12), (0, 0, 0), 10)
    assert hd95_mm(_cube((12, 12, 12), (0, 0, 2), 10), edge, (1.0, 1.0, 1.0)) == \
        pytest.approx(2.0)


def test_hd95_and_dice_undefined_cases() -> None:
    ref = _cube((10, 10, 10), (2, 2, 2), 4)
    empty = np.zeros_like(ref)
    assert math.isnan(hd95_mm(empty, ref, (1.0, 1.0, 1.0)))
    assert math.isnan(hd95_mm(ref, empty, (1.0, 1.0, 1.0)))
    assert dice(empty, ref) == 0.0
    assert math.isnan(dice(empty, empty))


def test_hd95_agrees_with_monai_on_irregular_shapes() -> None:
    import torch  # both are dependencies of the project: a missing one must fail
    from monai.metrics import compute_hausdorff_distance as hd

    z, y, x = np.mgrid[:24, :40, :36]
    ref = ((z - 11) / 7.0) ** 2 + ((y - 20) / 13.0) ** 2 + ((x - 17) / 10.0) ** 2 <= 1
    pred = ((z - 12) / 6.0) ** 2 + ((y - 23) / 11.0) ** 2 + ((x - 15) / 12.0) ** 2 <= 1
    pred[3:6, 5:9, 4:7] = True  # a detached island, far from the reference
    spacing = (2.5, 0.8, 0.8)
    expected = float(hd(torch.from_numpy(pred[None, None]), torch.from_numpy(ref[None, None]),
                        include_background=True, percentile=95, spacing=spacing)[0, 0])
    assert hd95_mm(pred, ref, spacing) == pytest.approx(expected, abs=1e-4)


def _seg_record(case_id: str, d: float, h: float, dx: str = "normal") -> CaseRecord:
    return CaseRecord(case_id, dx, 0.1, True, dice=d, hd95_mm=h)


def test_segmentation_summary_and_detection_rate() -> None:
    recs = [_seg_record("a", 0.9, 2.0), _seg_record("b", 0.0, float("nan")),
            _seg_record("c", 0.6, 4.0), _seg_record("d", 0.3, 10.0),
            _seg_record("e", float("nan"), float("nan"))]  # no labelled pancreas
    seg = summarise(recs, n_boot=30)["segmentation"]
    assert seg["n_cases_with_pancreas"] == 4
    assert seg["n_hd95_defined"] == 3
    assert seg["dice_mean"]["value"] == pytest.approx(0.45)
    assert seg["dice_median"]["value"] == pytest.approx(0.45)
    assert seg["hd95_mm_mean"]["value"] == pytest.approx(16 / 3, abs=1e-4)
    assert seg["hd95_mm_median"]["value"] == pytest.approx(4.0)
    assert seg["detection_rate"]["value"] == pytest.approx(0.75)  # b has no overlap
    assert seg["dice_ge_050_rate"]["value"] == pytest.approx(0.5)
    lo, hi = seg["dice_mean"]["ci95"]
    assert lo <= 0.45 <= hi and lo < hi


def test_reference_lesion_location_along_the_gland() -> None:
    from pipelines.evaluation.metrics import LOCATIONS
    from pipelines.pancreas.measures import LOCATION_CUTS

    assert tuple(name for _, name in LOCATION_CUTS) == LOCATIONS  # the SR's parts, in order
    lab = np.zeros((12, 16, 110), np.uint8)
    lab[4:8, 5:11, 5:105] = 1  # a bar along x: head at -x (patient's right), tail at +x
    spots = {"head": 10, "neck": 40, "body": 60, "tail": 98}
    lesions = []
    for x in spots.values():
        lab[5:7, 7:9, x:x + 3] = 2
        m = np.zeros(lab.shape, bool)
        m[5:7, 7:9, x:x + 3] = True
        lesions.append(m)
    img = sitk.GetImageFromArray(np.zeros(lab.shape, np.float32))
    img.SetSpacing((0.8, 0.8, 2.5))
    assert reference_locations(lesions, lab > 0, img) == list(spots)
    flipped = sitk.GetImageFromArray(np.zeros(lab.shape, np.float32))
    flipped.SetSpacing((0.8, 0.8, 2.5))
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # columns run to the patient's right
    # the same anatomy stored mirrored: the parts follow the patient, not the array
    assert reference_locations([m[..., ::-1] for m in lesions], (lab > 0)[..., ::-1],
                               flipped) == list(spots)
    assert reference_locations(lesions, lab > 0, flipped)[0] == "tail"


def test_sensitivity_by_location_at_the_operating_point() -> None:
    def lesion(cid: str, loc: str, hit: float) -> CaseRecord:
        conf = [hit] if hit else []
        return CaseRecord(cid, "PDAC", 0.9, True, [*conf, 0.1], [*[True] * len(conf), False],
                          [15.0], [hit], gt_location=[loc])

    recs = [lesion("h1", "head", 0.9), lesion("h2", "head", 0.0), lesion("t1", "tail", 0.8),
            lesion("b1", "body", 0.0), lesion("b2", "body", 0.05)]  # 0.05 < threshold 0.1
    # 6 FPs at 0.07 push the <= 1 FP/volume point above 0.07 and b2's 0.05 hit
    recs += [CaseRecord(f"n{i}", "normal", 0.1, True, [0.07, 0.07], [False, False], [], [])
             for i in range(3)]
    m = summarise(recs, n_boot=30)
    assert m["lesion"]["threshold"] == pytest.approx(0.1)
    by = m["lesion"]["sensitivity_by_location"]
    assert (by["head"]["value"], by["head"]["n"]) == (0.5, 2)
    assert (by["tail"]["value"], by["tail"]["n"]) == (1.0, 1)
    assert (by["body"]["value"], by["body"]["n"]) == (0.0, 2)
    assert (by["neck"]["value"], by["neck"]["n"]) == (None, 0)
    assert m["lesion"]["location_unknown"] == 0
    assert m["lesion"]["sensitivity"]["value"] == pytest.approx(0.4)


@dataclass
class _Lesion:
    mask: npt.NDArray[np.bool_]
    confidence: float


@dataclass
class _Report:
    """A stand-in pipeline report whose generic result says what ``status`` says."""

    patient_score: float
    pancreas_mask: npt.NDArray[np.bool_] | None
    lesions: list[_Lesion] = field(default_factory=list)
    status: str = "assessed"
    reason: str | None = None
    pancreas_found: bool = True

    def to_result(self) -> AnalysisResult:
        return AnalysisResult(pipeline="pancreas-ct", algorithm=AlgorithmInfo("t", "0"),
                              source_sop_instance_uids=[], status=self.status,  # type: ignore[arg-type]
                              reason=self.reason)


def _case(lesion: bool) -> tuple[sitk.Image, sitk.Image, npt.NDArray[np.bool_]]:
    lab = np.zeros((10, 20, 40), np.uint8)
    lab[3:7, 6:14, 5:35] = 1
    les = np.zeros(lab.shape, bool)
    if lesion:
        les[4:6, 8:12, 8:12] = True
        lab[les] = 2
    img = sitk.GetImageFromArray(np.zeros(lab.shape, np.float32))
    img.SetSpacing((1.0, 1.0, 2.0))
    limg = sitk.GetImageFromArray(lab)
    limg.CopyInformation(img)
    return img, limg, les


def test_not_assessable_cases_are_counted_and_scored_as_missed() -> None:
    from pipelines.pancreas.output import PancreasReport

    img, lab, les = _case(lesion=True)
    gland = sitk.GetArrayFromImage(lab) > 0
    # assessed and found: the lesion is hit, the score is the pipeline's
    seen = record_case("pdac-seen", "PDAC", img, lab, _Report(0.95, gland, [_Lesion(les, 0.9)]))
    assert seen.assessable and seen.score == 0.95 and seen.gt_hit_conf == [0.9]
    assert seen.gt_location == ["head"] and seen.dice == 1.0 and seen.hd95_mm == 0.0
    # declined by an applicability check, although it drew the lesion: nothing counts
    declined = record_case("pdac-declined", "PDAC", img, lab, _Report(
        0.99, gland, [_Lesion(les, 0.99)], status="not_assessable",
        reason="field of view does not cover the upper abdomen"))
    assert not declined.assessable
    assert declined.reason == "field of view does not cover the upper abdomen"
    assert declined.cand_conf == [] and declined.gt_hit_conf == [0.0]
    assert declined.score == LOWEST_SCORE
    assert declined.dice == 1.0  # the stage-1 gland is still scored as a segmentation
    # today's not-assessable case: the pancreas pipeline found no pancreas
    n_img, n_lab, _ = _case(lesion=False)
    lost = record_case("normal-lost", None, n_img, n_lab, PancreasReport(
        pipeline="pancreas-ct", algorithm=AlgorithmInfo("t", "0"), source_sop_instance_uids=[],
        patient_score=0.0, pancreas_found=False))
    assert not lost.assessable and lost.reason == "pancreas not found"
    assert lost.diagnosis == "normal" and lost.dice == 0.0 and math.isnan(lost.hd95_mm)
    normals = [CaseRecord(f"n{i}", "normal", 0.2, True, dice=0.8, hd95_mm=3.0)
               for i in range(2)]
    m = summarise([seen, declined, lost, *normals], n_boot=30)
    na = m["not_assessable"]
    assert na["n"] == 2
    assert na["by_diagnosis"] == {"PDAC": 1, "normal": 1}
    assert [c["case_id"] for c in na["cases"]] == ["pdac-declined", "normal-lost"]
    assert "lowest" in na["scoring"] and "missed" in na["scoring"]
    assert m["lesion"]["sensitivity"]["value"] == 0.5  # the declined PDAC's lesion is missed
    # PDAC scores 0.95 and 0 (declined) against normals 0.2, 0.2, 0: (3 + 0.5) / 6
    assert m["patient"]["auroc"]["value"] == pytest.approx(3.5 / 6, abs=1e-4)
    assert m["segmentation"]["detection_rate"]["value"] == pytest.approx(4 / 5)
    # Dice 1, 1, 0 (no mask), 0.8, 0.8; over the three assessed cases: (1 + 0.8 + 0.8) / 3
    assert m["segmentation"]["dice_mean"]["value"] == pytest.approx(3.6 / 5)
    assert m["segmentation"]["dice_mean_assessed"]["value"] == pytest.approx(2.6 / 3, abs=1e-4)
    from pipelines.evaluation.run import markdown_table

    text = markdown_table({**m, "set_name": "unit", "pipeline": "p", "data": "d"})
    assert "Not assessable: 2 of 5 cases (PDAC 1, normal 1)" in text
    assert "| pdac-declined | PDAC | field of view does not cover the upper abdomen |" in text


def test_all_declined_gives_strict_json_and_a_table() -> None:
    from pipelines.evaluation.run import markdown_table

    recs = [CaseRecord(f"c{i}", dx, LOWEST_SCORE, False, [], [], sizes, [0.0] * len(sizes),
                       gt_location=["body"] * len(sizes), assessable=False,
                       reason="anatomy check", dice=0.0)
            for i, (dx, sizes) in enumerate([("PDAC", [20.0]), ("normal", []), ("PNET", [12.0])])]
    m = summarise(recs, n_boot=20)
    assert m["lesion"]["threshold"] is None  # no candidate anywhere: no operating point
    json.dumps(m, allow_nan=False)  # no Infinity / NaN in metrics.json
    assert m["lesion"]["sensitivity_by_location"]["body"]["value"] == 0.0
    assert m["not_assessable"]["by_diagnosis"] == {"PDAC": 1, "PNET": 1, "normal": 1}
    text = markdown_table({**m, "pipeline": "p", "data": "d"})
    assert "| Operating threshold (<= 1 FP/volume) | n/a (no candidate) |" in text
    assert "| Operating threshold (<= 1 FP/volume) | n/a | n/a |" in compare_table(m, m, ("a", "b"))


def test_compare_prints_two_sets_side_by_side(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    a = {**summarise(_records(), n_boot=10), "set_name": "generator-v1 fresh"}
    worse = [CaseRecord(r.case_id, r.diagnosis, 0.5, True, r.cand_conf, r.cand_tp,
                        r.gt_size_mm, r.gt_hit_conf) for r in _records()]
    b = {**summarise(worse, n_boot=10), "set_name": "randomised-appearance"}
    table = compare_table(a, b, ("A", "B"))
    assert "| Metric | generator-v1 fresh | randomised-appearance |" in table
    assert "| Patient AUROC (PDAC) | 1.000 (" in table
    assert "| Patient AUROC (PDAC) | 1.000 (1.000–1.000) | 0.500 (0.500–0.500) |" in table
    older = {k: v for k, v in b.items() if k != "segmentation"}  # a metrics.json before 16
    assert "| Pancreas Dice, mean | n/a | — |" in compare_table(a, older, ("A", "B"))
    for name, m in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    r = CliRunner().invoke(app, ["evaluate", "--compare", str(tmp_path / "a"),
                                 str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert r.output == table
    r = CliRunner().invoke(app, ["evaluate", "--compare", str(tmp_path / "a"),
                                 str(tmp_path / "missing")])
    assert r.exit_code != 0 and "no metrics.json" in str(r.exception) + r.output
    r = CliRunner().invoke(app, ["evaluate", "--set-name", "x"])
    assert r.exit_code != 0
    assert "--data and --out are required" in str(r.exception) + r.output
