"""From readers' SEGs to a promoted model, end to end through a running node.

Phantoms written as DICOM and a reader's SEG of each (highdicom, written here
from the phantom's own label map) are sent to ``ainode serve`` with dcmtk's
``storescu``, as a reader's workstation would. Then, with the CLI only: the
reference diagnoses, ``ainode dataset export`` (de-identified by gdcmanon,
the mapping kept on the node), ``ainode train --init`` for two seeded
iterations, ``ainode models shadow`` beside the live rule, a new series that
both the active and the candidate models judge (the candidate's results
never reach the PACS), the readers' verdicts, ``ainode models compare`` on
the same series and ``ainode models promote``, after which the next job of
the running node uses the promoted package.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
import sqlalchemy as sa

from pipelines.phantom.generator import PhantomSpec, generate
from pipelines.phantom.io import write_dicom_series
from storage.models import AuditEvent, Finding, Job, JobState, Output, Series, Transfer
from tests.support.net import wait_for
from tests.support.node import NodeProc, start_node
from tests.support.peers import dcmtk_env, require, store_scp

pytestmark = [pytest.mark.peers, pytest.mark.slow]

SITE = "pancreas-ct-stage2@0.9.0-site"
SHIPPED_STAGE2 = Path(__file__).resolve().parents[1] / "pipelines/weights/pancreas-ct-stage2"


def reader_seg(folder: Path, label: np.ndarray, out: Path) -> Path:
    """A reader's SEG of the series in ``folder``: segment 1 pancreas, 2 lesion."""
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    mask = np.stack([(label >= 1), (label == 2)], axis=-1)  # pancreas includes its lesion
    descs = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Pancreas",
            segmented_property_category=hd.sr.CodedConcept("123037004", "SCT",
                                                           "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("15776009", "SCT", "Pancreas"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Lesion",
            segmented_property_category=hd.sr.CodedConcept(
                "49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL),
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Reading workstation", manufacturer_model_name="RW",
        software_versions="1", device_serial_number="1")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "seg.dcm"
    seg.save_as(path)
    return path


def send(node: NodeProc, files: list[Path]) -> None:
    # -R: propose exactly the files' SOP classes (storescu's default list lacks SEG).
    r = subprocess.run([require("storescu"), "-R", "-aet", "STORESCU", "-aec", "AINODE",
                        "127.0.0.1", str(node.port), *map(str, files)], env=dcmtk_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def phantom_series(tmp: Path, seed: int) -> tuple[Path, np.ndarray, str]:
    p = generate(PhantomSpec(seed=seed, contrast="ct", diagnosis="PDAC",
                             lesion_diameter_mm=24.0))
    folder = tmp / f"ct-{seed}"
    files = write_dicom_series(p, folder, seed=seed)
    return folder, p.label, str(pydicom.dcmread(files[0]).SeriesInstanceUID)


def done_jobs(node: NodeProc, series_uid: str) -> list[Job]:
    with node.db.session() as s:
        jobs = list(s.scalars(sa.select(Job).join(Job.series).where(
            Series.series_instance_uid == series_uid)))
        s.expunge_all()
    return [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_reader_segs_to_a_shadowed_compared_and_promoted_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with store_scp(tmp_path / "pacs", "LOOPPACS") as pacs_port:
        node = start_node(tmp_path, workers=1, extra={
            "inference": {"models_dir": str(models), "device": "cpu"},
            "destinations": [{"name": "pacs", "ae_title": "LOOPPACS", "host": "127.0.0.1",
                              "port": pacs_port, "accepts": ["SR"]}]})
        try:
            _loop(node, tmp_path, models)
        finally:
            node.stop()


def _loop(node: NodeProc, tmp: Path, models: Path) -> None:
    ok(node.ainode("rules", "add", "abdomen", "--when", "Modality=CT", "--pipeline",
                   "pancreas-ct", "--send-to", "pacs"))
    # Two reader-segmented cases, sent like a reader's workstation sends them.
    train_uids = []
    for seed in (778001, 778002):
        folder, label, uid = phantom_series(tmp, seed)
        seg = reader_seg(folder, label, tmp / f"seg-{seed}")
        send(node, [*sorted(folder.glob("*.dcm")), seg])
        train_uids.append(uid)
    wait_for(lambda: all(done_jobs(node, u) for u in train_uids), timeout=400,
             what="the active model's jobs on the training series")
    ok(node.ainode("feedback", "reference", train_uids[0], "PDAC", "--reader", "path"))
    csv_path = tmp / "dx.csv"
    csv_path.write_text(f"series_uid,diagnosis\n{train_uids[1]},PDAC\n")
    # Export: de-identified, in the layout `ainode train` reads, the mapping kept here.
    export = tmp / "export"
    out = ok(node.ainode("dataset", "export", "--out", str(export), "--diagnoses",
                         str(csv_path), "--with-dicom"))
    assert "exported 2 cases" in out, out
    with (export / "cases.csv").open() as fh:
        assert [r["diagnosis"] for r in csv.DictReader(fh)] == ["PDAC", "PDAC"]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(export / "labelsTr/ainode_0001.nii.gz")))
    assert set(np.unique(lab)) == {0, 1, 2}
    img = sitk.ReadImage(str(export / "imagesTr/ainode_0001_0000.nii.gz"))
    assert img.GetSize()[::-1] == lab.shape
    for f in (export / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES" and "Phantom" not in str(ds.PatientName)
        assert str(ds.SeriesInstanceUID) not in train_uids and 0x04000500 not in ds
    everything = b"".join(p.read_bytes() for p in export.rglob("*") if p.is_file())
    assert all(u.encode() not in everything for u in train_uids)
    assert b"PHANTOM0" not in everything  # the patient IDs
    mapping = next((node.data_dir / "deid" / "mappings").glob("export-*.csv"))
    assert train_uids[0] in mapping.read_text() and export not in mapping.parents
    # Fine-tune the active stage 2 on it, a couple of seeded iterations.
    pkg = tmp / "site-stage2"
    ok(node.ainode("train", "--data", str(export), "--out", str(pkg), "--task", "stage2",
                   "--init", str(SHIPPED_STAGE2), "--iterations", "2", "--version",
                   "0.9.0-site"))
    manifest = (pkg / "model.yaml").read_text()
    assert "fine_tuned_from" in manifest and "0.4.0-demo" in manifest
    ok(node.ainode("models", "shadow", str(pkg), "--rule", "abdomen", "--name", "site1"))
    # A new series: the active rule and the shadow candidate both judge it.
    folder, _, live_uid = phantom_series(tmp, 778003)
    send(node, sorted(folder.glob("*.dcm")))
    wait_for(lambda: len(done_jobs(node, live_uid)) == 2, timeout=400,
             what="active and shadow jobs on the live series")
    jobs = done_jobs(node, live_uid)
    assert all(j.state == JobState.DONE for j in jobs), [j.error for j in jobs]
    shadow = next(j for j in jobs if j.shadow)
    active = next(j for j in jobs if not j.shadow)
    # The version column is shortened to 64 characters; the provenance has every model.
    assert SITE in shadow.provenance["result"]["models"]
    assert SITE not in active.provenance["result"]["models"]
    assert shadow.model_version != active.model_version
    assert shadow.provenance["candidate_models_dir"].endswith("site1")
    with node.db.session() as s:
        sent = s.scalar(sa.select(sa.func.count()).select_from(Transfer).join(Output)
                        .where(Output.job_id == shadow.id))
        assert sent == 0  # the candidate's results never go to the PACS
        lesions = list(s.scalars(sa.select(Finding.id).where(
            Finding.job_id == active.id, Finding.probability.is_not(None))))
    assert lesions
    for fid in lesions:
        ok(node.ainode("feedback", "verdict", str(fid), "agree", "--reader", "dr-a"))
    ok(node.ainode("feedback", "reference", live_uid, "PDAC", "--reader", "path"))
    rep = json.loads(ok(node.ainode("models", "compare", "active", "site1", "--since",
                                    "30d", "--bootstrap", "100", "--json")))
    assert rep["series"] == 1
    assert set(rep["models"]) == {"active", "site1"}
    assert rep["models"]["site1"]["model_versions"] == [shadow.model_version]
    assert rep["models"]["active"]["counts"]["reference_positive"] == 1
    assert rep["models"]["active"]["ppv"]["value"] == 1.0
    # Promote: the package goes into models_dir, the shadow rule goes, audited.
    out = ok(node.ainode("models", "promote", "site1"))
    assert "promoted pancreas-ct-stage2 0.9.0-site" in out
    assert "0.9.0-site" in (models / "pancreas-ct-stage2" / "model.yaml").read_text()
    with node.db.session() as s:
        ev = s.scalars(sa.select(AuditEvent).where(AuditEvent.event == "model.promoted")).one()
        assert ev.details["installed"] == [{"name": "pancreas-ct-stage2",
                                            "version": "0.9.0-site"}]
    rules = json.loads(ok(node.ainode("rules", "list", "--json")))
    assert [r["name"] for r in rules] == ["abdomen"]
    # The running node's next job on the active rule runs the promoted package.
    ok(node.ainode("reprocess", live_uid, "--rule", "abdomen"))
    wait_for(lambda: len(done_jobs(node, live_uid)) == 3, timeout=400,
             what="the reprocessed job")
    newest = max(done_jobs(node, live_uid), key=lambda j: j.id)
    assert newest.state == JobState.DONE and not newest.shadow, newest.error
    assert SITE in newest.provenance["result"]["models"]
    assert newest.model_version == shadow.model_version  # the set the candidate ran
