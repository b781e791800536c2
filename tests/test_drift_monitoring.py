"""Drift monitoring on the node: real jobs keep quality records; a shifted stream alerts.

The streams are phantom CTs written as DICOM and run as jobs by ``run_job`` with
the shipped pancreas-ct models, compared with the reference shipped in the
stage-2 package (``ainode evaluate --write-reference`` on validation phantoms
800000-800039). The unshifted stream is fresh seeds of the same generator; the
shifted one is what a new protocol does to the organ: contrast enhancement
halved (an earlier phase) and image noise of SD 40 HU added (a lower dose).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.config import NodeConfig
from node.jobs import JobDeps, run_job
from node.quality import run_quality_check
from node.web.context import WebContext
from node.web.metrics import NodeCollector
from pipelines import registry
from pipelines.phantom.generator import PhantomSpec, generate
from pipelines.phantom.io import write_dicom_series
from storage import jobs as job_store
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest.header import header_attributes
from storage.models import (
    AuditEvent,
    Instance,
    QualityCheck,
    QualityRecord,
    RoutingRule,
    Series,
    Study,
    utcnow,
)

pytestmark = pytest.mark.slow

STREAM = 8


def _spool(db: Database, store: FileStore, folder: Path) -> int:
    """The series' files in the spool and its rows, as the receiver leaves them."""
    files = sorted(folder.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    with db.session() as s:
        series = Series(series_instance_uid=str(first.SeriesInstanceUID),
                        study=Study(study_instance_uid=str(first.StudyInstanceUID)),
                        modality="CT", state="routed", instance_count=len(files),
                        attributes=header_attributes(first))
        s.add(series)
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            stored = store.write_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                          str(ds.SOPInstanceUID), [f.read_bytes()])
            s.add(Instance(sop_instance_uid=str(ds.SOPInstanceUID), series=series,
                           sop_class_uid=str(ds.SOPClassUID),
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                           path=stored.relpath, size_bytes=stored.size, sha256=stored.sha256))
        s.flush()
        return series.id


def _job(db: Database, series_id: int, version: str) -> int:
    with db.session() as s:
        rule = s.scalars(select(RoutingRule).where(RoutingRule.name == "abdomen")).first()
        if rule is None:
            rule = RoutingRule(name="abdomen", version=1, pipeline="pancreas-ct",
                               conditions=[], destinations=[], shadow=False)
            s.add(rule)
            s.flush()
        req = job_store.JobRequest(pipeline="pancreas-ct", model_version=version, rule=rule)
        job, _ = job_store.ensure_job(s, s.get_one(Series, series_id), req)
        return job.id


def _stream(db: Database, store: FileStore, tmp: Path, seeds: range, *,
            shifted: bool) -> None:
    """Each seed a phantom CT series, run as a pancreas-ct job through run_job."""
    deps = JobDeps(db, store, NodeConfig(storage={"data_dir": store.data_dir}), device="cpu")
    version = registry.get("pancreas-ct", device="cpu").model_version()
    for seed in seeds:
        ph = generate(PhantomSpec(seed=seed, contrast="ct"))
        if shifted:
            organ = ph.label > 0
            ph.image[organ] = 45.0 + (ph.image[organ] - 45.0) * 0.5
            ph.image += np.random.default_rng(seed).normal(0.0, 40.0, ph.image.shape)
        folder = tmp / f"series-{seed}"
        write_dicom_series(ph, folder, seed=seed)
        job_id = _job(db, _spool(db, store, folder), version)
        assert job_store.claim_next(db, "drift-test", lease_s=600) == job_id
        run_job(job_id, "drift-test", deps)


def _metrics(db: Database, store: FileStore) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    ctx = WebContext(config=NodeConfig(storage={"data_dir": store.data_dir}), db=db,
                     store=store)
    reg = CollectorRegistry()
    reg.register(NodeCollector(ctx))
    return generate_latest(reg).decode()


def test_a_shifted_stream_alerts_in_status_metrics_and_audit_and_an_unshifted_one_does_not(
        sqlite_db: Database, filestore: FileStore, tmp_path: Path) -> None:
    config = NodeConfig(storage={"data_dir": filestore.data_dir})
    start = utcnow() - timedelta(seconds=1)
    _stream(sqlite_db, filestore, tmp_path, range(880000, 880000 + STREAM), shifted=False)
    with sqlite_db.session() as s:
        rows = list(s.scalars(select(QualityRecord)))
        assert len(rows) == STREAM  # one record per job, with what the issue names
        row = rows[0]
        assert row.scanner == "dicom-ai-node phantom" and row.descriptors["kvp"] == 120.0
        assert {"organ_mean", "organ_noise", "slice_thickness_mm", "pixel_spacing_mm"} \
            <= set(row.descriptors)
        assert {"patient_score", "candidates", "top_confidence"} <= set(row.outputs)
        assert row.features is not None and len(row.features) > 16
    calm = run_quality_check(sqlite_db, config, since=start)
    by_group = {(r.pipeline, r.scanner): r for r in calm}
    assert set(by_group) == {("pancreas-ct", "*"), ("pancreas-ct", "dicom-ai-node phantom")}
    everyone = by_group[("pancreas-ct", "*")]
    print("unshifted", json.dumps(everyone.as_dict()["descriptors"]), everyone.drift and (
        everyone.drift.feature_mmd, everyone.drift.feature_mmd_p))
    assert everyone.n_reference == 40 and everyone.drift is not None
    assert everyone.drift.descriptors, "nothing was compared"
    assert [r.alerts for r in calm] == [[], []]

    shifted_from = utcnow()
    _stream(sqlite_db, filestore, tmp_path, range(890000, 890000 + STREAM), shifted=True)
    loud = run_quality_check(sqlite_db, config, since=shifted_from)
    everyone = next(r for r in loud if r.scanner == "*")
    print("shifted", json.dumps(everyone.as_dict()["descriptors"]), everyone.drift and (
        everyone.drift.feature_mmd, everyone.drift.feature_mmd_p), everyone.alerts)
    assert any(a.startswith(("organ_mean", "organ_noise", "organ_sd")) for a in everyone.alerts)
    with sqlite_db.session() as s:
        alerts = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "qa.alert")))
        assert {a.details["scanner"] for a in alerts} == {"*", "dicom-ai-node phantom"}
        assert all(a.outcome == "warning" for a in alerts)
    # The same alert found again is stored, not audited again.
    run_quality_check(sqlite_db, config, since=shifted_from)
    with sqlite_db.session() as s:
        assert len(list(s.scalars(select(AuditEvent).where(
            AuditEvent.event == "qa.alert")))) == 2
        assert len(list(s.scalars(select(QualityCheck)))) == 6

    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"storage:\n  data_dir: {filestore.data_dir}\n")
    out = subprocess.run([sys.executable, "-m", "node", "--config", str(cfg), "status",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)[0]
    assert any(line.startswith("pancreas-ct | all scanners: organ_")
               for line in status["quality_alerts"]), status["quality_alerts"]
    text = _metrics(sqlite_db, filestore)
    line = next(ln for ln in text.splitlines()
                if ln.startswith('ainode_quality_alerts{pipeline="pancreas-ct",scanner="*"}'))
    assert float(line.split()[-1]) >= 1.0

    # The window moves past the shifted stream: the groups clear, audited once each.
    later = utcnow() + timedelta(days=1)
    run_quality_check(sqlite_db, config, now=later, since=later - timedelta(hours=1))
    with sqlite_db.session() as s:
        cleared = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "qa.cleared")))
        assert {c.details["scanner"] for c in cleared} == {"*", "dicom-ai-node phantom"}
