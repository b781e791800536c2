"""Calibration (issue 20): ECE, the fitted maps, `ainode calibrate` and `evaluate`, and that
every reader-facing place shows the calibrated value and says so."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from node.cli import app
from node.findings import finding_rows
from node.web.app import create_app
from pipelines.calibration import CalibrationEntry, ScoreMap, ece, fit, reliability
from pipelines.dicom_out import write_results
from pipelines.models.package import read_manifest, write_calibration
from pipelines.pancreas import build_pipeline
from pipelines.pancreas.model import SHIPPED_WEIGHTS
from pipelines.pancreas.output import PancreasReport
from pipelines.phantom import PhantomSpec, generate, phantom_to_sitk
from pipelines.phantom.io import merge_cases_csv
from storage.models import Job, JobState, Series, Study
from tests.test_dicom_out_writers import load_sorted, make_result
from tests.test_web import _login, _make

# --- the numbers -----------------------------------------------------------------------


def test_ece_of_known_cases() -> None:
    assert ece([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert ece([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    # Two bins: 0.2 (1 of 4 positive: 0.05 off) and 0.8 (2 of 4: 0.3 off) -> 0.175.
    assert ece([0.2] * 4 + [0.8] * 4, [True, False, False, False, True, True, False, False]) \
        == pytest.approx(0.175)
    bins = reliability([0.05, 0.95], [False, True])
    assert [b["n"] for b in bins] == [1] + [0] * 8 + [1]


def test_temperature_undoes_overconfidence_and_isotonic_is_monotone_and_shrunk() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-z))
    over = 1 / (1 + np.exp(-3 * z))  # three times too sharp
    t = fit(over, y, "temperature")
    assert t.temperature == pytest.approx(3.0, rel=0.1)
    assert ece(t.apply(over), y) < 0.5 * ece(over, y)
    iso = fit(over, y, "isotonic")
    xs = np.linspace(0, 1, 101)
    assert np.all(np.diff(iso.apply(xs)) >= 0)
    assert ece(iso.apply(over), y) < 0.5 * ece(over, y)
    small = fit([0.1, 0.2, 0.8, 0.9], [False, False, True, True], "isotonic")
    assert small.y == [pytest.approx(1 / 4), pytest.approx(3 / 4)]  # (k+1)/(n+2), never 0 or 1
    with pytest.raises(ValueError):
        fit([0.1, 0.9], [True, True])
    with pytest.raises(ValueError):
        ScoreMap(method="isotonic", x=[0.1, 0.5], y=[0.6, 0.4])


# --- what a reader sees ------------------------------------------------------------------

CAL = "patient temperature T=2; lesion temperature T=2 (fitted on a test)"


def _calibrated(report: PancreasReport) -> PancreasReport:
    report.raw_patient_score, report.patient_score = report.patient_score, 0.77
    report.lesions = [dataclasses.replace(les, raw_confidence=les.confidence,
                                          confidence=0.66) for les in report.lesions]
    report.calibration = CAL
    return report


def _numbers(ds: object) -> dict[str, float]:
    out: dict[str, float] = {}

    def walk(items: object) -> None:
        for it in items or []:  # type: ignore[attr-defined]
            if it.get("ValueType") == "NUM":
                name = str(it.ConceptNameCodeSequence[0].CodeMeaning)
                out.setdefault(name, float(it.MeasuredValueSequence[0].NumericValue))
            walk(it.get("ContentSequence"))

    walk(ds.ContentSequence)  # type: ignore[attr-defined]
    return out


def test_sr_seg_and_finding_rows_show_the_calibrated_value_and_say_so() -> None:
    sources = load_sorted("ct_phantom_philips")
    report = _calibrated(make_result(sources))
    result = report.to_result()
    objs = {o.kind: o.dataset for o in write_results(result, sources, {"SEG", "SR"})}
    nums = _numbers(objs["SR"])
    assert nums["Calibrated patient-level PDAC probability"] == 0.77
    assert nums["Calibrated lesion confidence"] == 0.66
    # One value per concept: the raw ones are not in the report.
    assert "Patient-level PDAC probability" not in nums and "Lesion confidence" not in nums
    assert 0.93 not in nums.values() and 0.92 not in nums.values()
    seg = hd.seg.Segmentation.from_dataset(objs["SEG"])
    labels = [str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers]
    assert "Lesion 1 (head) calibrated conf 0.66" in labels
    rows = finding_rows(1, result)
    patient = next(r for r in rows if r.kind == "patient")
    assert patient.label == "Calibrated patient-level PDAC probability"
    assert patient.probability == 0.77
    assert patient.details["calibrated"] is True and patient.details["raw_probability"] == 0.93
    lesion = next(r for r in rows if r.kind == "lesion")
    assert lesion.details["score_name"] == "Calibrated lesion confidence"
    assert "calibrated conf 0.66" in lesion.details["legend"]
    # The uncalibrated report keeps the plain names.
    plain = finding_rows(1, make_result(sources).to_result())
    assert plain[0].label == "Patient-level PDAC probability" and \
        "calibrated" not in plain[0].details


def test_the_console_marks_calibrated_values(tmp_path: Path) -> None:
    sources = load_sorted("ct_phantom_philips")
    ctx = _make(tmp_path)
    with ctx.db.session() as s:
        st = Study(study_instance_uid="1.2.3")
        ser = Series(series_instance_uid="1.2.3.4", study=st)
        job = Job(series=ser, pipeline="pancreas-ct", state=JobState.DONE)
        s.add_all([st, ser, job])
        s.flush()
        s.add_all(finding_rows(job.id, _calibrated(make_result(sources)).to_result()))
    with TestClient(create_app(ctx)) as client:
        _login(client, "vic")
        page = client.get("/series/1.2.3.4", headers={"accept": "text/html"}).text
    ctx.close()
    ctx.db.dispose()
    cells = page.split('id="findings"')[1].split("</table>")[0]
    assert "Calibrated patient-level PDAC probability" in cells
    assert cells.count(">calibrated</span>") == 3  # the patient score and both lesions
    assert "0.77" in cells and "0.66" in cells and "0.93" not in cells


# --- fitting through the commands, stored in the package ------------------------------------

CASES = (("PDAC", 800101), ("PDAC", 800102), ("normal", 800103), ("normal", 800104))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import SimpleITK as sitk  # noqa: N813

    root = tmp_path_factory.mktemp("cal")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rows = []
    for dx, seed in CASES:
        ph = generate(PhantomSpec(seed=seed, diagnosis=dx, lesion_diameter_mm=25.0))
        img, lab = phantom_to_sitk(ph)
        case = f"phantom_{seed}"
        sitk.WriteImage(sitk.Cast(img, sitk.sitkInt16), str(root / "imagesTr" /
                                                            f"{case}_0000.nii.gz"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}.nii.gz"))
        rows.append({"case_id": case, "diagnosis": ph.diagnosis, "lesion_diameter_mm": "25.0",
                     "location": ph.lesion_location or ""})
    merge_cases_csv(root / "cases.csv", rows, ("case_id", "diagnosis", "lesion_diameter_mm",
                                                "location"))
    return root


def test_calibrate_stores_it_and_the_pipeline_and_evaluate_use_it(
        small_set: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(SHIPPED_WEIGHTS / "pancreas-ct-stage2", models / "pancreas-ct-stage2")
    before = read_manifest(models / "pancreas-ct-stage2")
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", "--data", str(small_set), "--models", str(models),
                              "--method", "isotonic", "--device", "cpu", "--quiet",
                              "--set-name", "test seeds 800101-800104"])
    assert res.exit_code == 0, res.output
    after = read_manifest(models / "pancreas-ct-stage2")
    assert after.calibration is not None and after.calibration.patient is not None
    assert after.calibration.patient.method == "isotonic"
    assert "test seeds 800101-800104: 4 cases" in after.calibration.fitted_on
    assert after.version.startswith(before.version + "+cal.")
    assert after.weights == before.weights
    # The shipped package is never written without being named.
    refused = runner.invoke(app, ["calibrate", "--data", str(small_set), "--device", "cpu"])
    assert refused.exit_code != 0 and "--write" in str(refused.exception)

    pipe = build_pipeline("pancreas-ct", models, device="cpu")
    ph = generate(PhantomSpec(seed=CASES[0][1], diagnosis="PDAC", lesion_diameter_mm=25.0))
    report = pipe.report(phantom_to_sitk(ph)[0])
    assert report.raw_patient_score is not None and report.calibration is not None
    assert report.patient_score == pytest.approx(
        after.calibration.patient.apply_one(report.raw_patient_score), abs=1e-4)
    assert report.provenance["calibration"] == after.calibration.describe()
    assert report.to_result().findings[0].label.startswith("Calibrated")

    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--data", str(small_set), "--out", str(out),
                              "--models", str(models), "--device", "cpu", "--bootstrap", "5",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["applied"] is True
    assert cal["patient"]["n"] == 4 and cal["patient"]["ece"] is not None
    assert cal["patient"]["uncalibrated"]["ece"] is not None
    # Both figures are measured: what the reader saw (the four cases' calibrated values,
    # shrunk towards 1/4 and 3/4 by a fit on four cases) and the raw ones.
    shown = [float(r["score"]) for r in _csv(out / "cases.csv")]
    assert shown and all(0.2 < v < 0.8 for v in shown)
    assert cal["patient"]["ece"] != cal["patient"]["uncalibrated"]["ece"]
    assert (out / "reliability.png").stat().st_size > 1000
    assert "ECE as reported" in (out / "metrics.md").read_text()

    # Removing it returns the package to its own version and raw scores.
    write_calibration(models / "pancreas-ct-stage2", None)
    assert read_manifest(models / "pancreas-ct-stage2").version == before.version


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_a_calibration_entry_round_trips_through_the_manifest(tmp_path: Path) -> None:
    pkg = tmp_path / "pancreas-ct-stage2"
    shutil.copytree(SHIPPED_WEIGHTS / "pancreas-ct-stage2", pkg)
    entry = CalibrationEntry(patient=ScoreMap(method="temperature", temperature=1.5),
                             lesion=ScoreMap(method="isotonic", x=[0.2, 0.9], y=[0.3, 0.8]),
                             fitted_on="a test")
    m = write_calibration(pkg, entry)
    assert read_manifest(pkg).calibration == entry
    assert m.calibration is not None and m.calibration.lesion is not None
    assert m.calibration.lesion.apply_one(0.55) == pytest.approx(0.55)
    assert "calibration:" in (pkg / "model.yaml").read_text()
