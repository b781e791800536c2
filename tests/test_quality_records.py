"""Drift monitoring's parts: the packaged reference, the records, ``ainode qa report/check``.

The end-to-end stream of real jobs is tests/test_drift_monitoring.py; here the
records are written straight into the database so that each rule of the check
(which records count, what is audited, what the CLI says and exits with) is
tested in seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import NodeConfig
from node.quality import header_values, run_quality_check, scanner_of
from pipelines import registry
from pipelines.models.package import load_qa_reference, verify_package, write_qa_reference
from pipelines.results import QualityRecord as Quality
from storage.db import Database
from storage.errors import ModelError
from storage.models import (
    AuditEvent,
    Job,
    QualityRecord,
    RoutingRule,
    Series,
    Study,
)

SHIPPED = Path(__file__).resolve().parents[1] / "pipelines" / "weights"


def test_the_shipped_ct_and_mr_packages_carry_a_drift_reference() -> None:
    for pipeline in ("pancreas-ct", "pancreas-mr"):
        ref = registry.quality_reference(pipeline)
        assert ref is not None, pipeline
        package, fitted_on, records = ref
        assert "stage2" in package and "validation phantoms" in fitted_on
        assert len(records) >= 30
        assert {"organ_mean", "organ_noise", "patient_score"} <= set(records[0]["descriptors"])


def test_a_reference_is_hashed_like_the_weights(tmp_path: Path) -> None:
    pkg = tmp_path / "stage2"
    shutil.copytree(SHIPPED / "pancreas-ct-stage2", pkg)
    before = verify_package(pkg).version
    m = write_qa_reference(pkg, [{"series": "a", "descriptors": {"x": 1.0}, "features": None}],
                           fitted_on="two test records")
    assert m.version == before  # the outputs did not change: no new model version
    assert m.qa_reference is not None and m.qa_reference.cases == 1
    assert load_qa_reference(pkg, m) == [{"series": "a", "descriptors": {"x": 1.0},
                                          "features": None}]
    (pkg / m.qa_reference.file).write_text("[]")
    with pytest.raises(ModelError, match="hash mismatch"):
        load_qa_reference(pkg, m)


def test_header_values_and_the_scanner_carry_no_identity() -> None:
    attrs = {"Manufacturer": "SIEMENS", "ManufacturerModelName": "SOMATOM Force",
             "KVP": "100", "SliceThickness": "1.5", "ConvolutionKernel": ["Br40d", "3"],
             "ContrastBolusAgent": "Iomeprol", "PatientName": "Doe^Jane"}
    assert scanner_of(attrs) == "SIEMENS SOMATOM Force"
    assert scanner_of({}) == "unknown"
    numbers, words = header_values(attrs)
    assert numbers == {"kvp": 100.0, "slice_thickness_mm": 1.5}
    assert words == {"kernel": "Br40d\\3", "contrast_agent": "Iomeprol"}
    assert "Doe" not in json.dumps(words)


def _records(db: Database, records: list[dict[str, object]], scanner: str, *,
             shift: float = 0.0, shadow: bool = False) -> None:
    """Quality rows as run_job leaves them, one job per record (organ_mean shifted)."""
    with db.session() as s:
        rule = RoutingRule(name=f"r-{scanner}-{shift}-{shadow}", version=1,
                           pipeline="pancreas-ct", conditions=[], destinations=[])
        s.add(rule)
        for i, rec in enumerate(records):
            se = Series(series_instance_uid=f"1.2.826.0.1.{abs(hash((scanner, shift, shadow)))}"
                        f".{i}", study=Study(study_instance_uid=f"1.2.826.0.2.{i}.{shift}"
                                             f".{len(scanner)}.{int(shadow)}"),
                        modality="CT", attributes={"Manufacturer": scanner})
            job = Job(series=se, pipeline="pancreas-ct", rule_key=rule.name, shadow=shadow)
            s.add(job)
            s.flush()
            d = dict(rec["descriptors"])  # type: ignore[call-overload]
            d["organ_mean"] = float(d.get("organ_mean", 0.0)) + shift
            s.add(QualityRecord(job_id=job.id, series_id=se.id, pipeline="pancreas-ct",
                                model_version="test", scanner=scanner_of(se.attributes),
                                shadow=shadow, descriptors=d, outputs={},
                                features=rec["features"]))


def _ainode(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=180)


def test_qa_report_compares_by_scanner_and_qa_check_audits_and_exits_1(
        sqlite_db: Database, data_dir: Path, tmp_path: Path) -> None:
    ref = registry.quality_reference("pancreas-ct")
    assert ref is not None
    records = ref[2]
    # A scanner like the validation set (its own cases, in another order) and one whose
    # organ reads 60 HU brighter; a shadow job's record is left out of either.
    _records(sqlite_db, records[::-1][:20], "Calm CT")
    _records(sqlite_db, records[:12], "Bright CT", shift=60.0)
    _records(sqlite_db, records[:12], "Calm CT", shift=500.0, shadow=True)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"storage:\n  data_dir: {data_dir}\n")

    rep = _ainode(cfg, "qa", "report", "--since", "1d", "--json")
    assert rep.returncode == 0, rep.stderr
    groups = {g["scanner"]: g for g in json.loads(rep.stdout)}
    assert set(groups) == {"*", "Calm CT", "Bright CT"}
    assert groups["Calm CT"]["n_recent"] == 20 and groups["Calm CT"]["alerts"] == []
    assert groups["Bright CT"]["alerts"] and \
        groups["Bright CT"]["alerts"][0].startswith("organ_mean")
    text = _ainode(cfg, "qa", "report", "--since", "1d")
    assert "pancreas-ct | Bright CT: 12 jobs" in text.stdout and "ALERT" in text.stdout
    with sqlite_db.session() as s:  # report only reads
        assert not list(s.scalars(select(AuditEvent).where(AuditEvent.event == "qa.alert")))

    check = _ainode(cfg, "qa", "check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "in alert (audited as qa.alert)" in check.stderr
    with sqlite_db.session() as s:
        audited = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "qa.alert")))
        assert {a.details["scanner"] for a in audited} == {"Bright CT", "*"}
    status = _ainode(cfg, "status", "--json")
    assert status.returncode == 0, status.stderr
    lines = json.loads(status.stdout)[0]["quality_alerts"]
    assert any(ln.startswith("pancreas-ct | Bright CT: organ_mean") for ln in lines), lines
    assert not any("Calm CT" in ln for ln in lines)


def test_a_pipeline_without_a_reference_is_listed_not_tested(
        sqlite_db: Database, data_dir: Path) -> None:
    _records(sqlite_db, [{"descriptors": {"organ_mean": 1.0}, "features": None}] * 6, "X")
    reports = run_quality_check(sqlite_db, NodeConfig(storage={"data_dir": data_dir}),
                                reference_of=lambda pipeline: None)
    assert reports and all(r.drift is None and r.alerts == [] for r in reports)
    assert all("no drift reference" in r.note for r in reports)


def test_a_result_without_quality_gives_no_row() -> None:
    from node.quality import quality_row
    from pipelines.results import AlgorithmInfo, AnalysisResult

    result = AnalysisResult("p", AlgorithmInfo("a", "1"), ["1.2.3"])
    assert quality_row(Job(id=1, pipeline="p"), Series(id=1), result, model_version="1") is None
    q = Quality({"organ_mean": 1.0}, {"patient_score": 0.5}, (0.1, 0.2))
    assert q.as_record("1.2.3") == {"series": "1.2.3", "descriptors": {
        "organ_mean": 1.0, "patient_score": 0.5}, "features": [0.1, 0.2]}
