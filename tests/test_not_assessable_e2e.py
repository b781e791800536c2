"""Series the pancreas models cannot judge, end to end through the real node.

Every non-abdominal series of ../shared/data/dicom (the head CT phantom and the
brain MRs) is sent with dcmtk ``storescu`` to one running ``ainode serve``
whose rules route CT to ``pancreas-ct`` and MR to ``pancreas-mr`` with the
shipped weights, and a dcmtk ``storescp`` stands for the PACS. Each must come
back as a DONE job whose outcome is ``not_assessable`` with a reason (the
``job.not_assessable`` audit event says it too), one SR at the PACS whose
impression reads "Not assessable: <reason>", and never a lesion: no lesion
Finding row, no SEG, no GSPS. ``mr_head_ge_epi4d`` is a 4D EPI (ten images at
each of 15 positions): the volume loader cannot make one volume of it, so no
pipeline judges it; it is a failed-input job (not retried) whose error names
the duplicate positions, and it sends nothing.

One node serves all the series (module scope), so the models load once. The
Philips enhanced MR is the classic series' acquisition as one multi-frame
object under the same SeriesInstanceUID; it is sent as a series of its own
(a temp copy with a new series UID), or the two would merge into one series
of duplicate positions.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from storage.models import AuditEvent, Finding, Job, JobOutcome, JobState, Output, Series
from tests.support.data import dicom_series_dir, sr_texts
from tests.support.net import wait_for
from tests.support.node import NodeProc, start_node
from tests.support.peers import dcmtk_env, require, store_scp

pytestmark = [pytest.mark.peers, pytest.mark.slow]

SINK_AET = "SINK"
# series -> the pipeline its rule sends it to
NOT_ABDOMINAL = {
    "ct_phantom_philips": "pancreas-ct",
    "mr_head_ge_3dt1": "pancreas-mr",
    "mr_head_philips_classic": "pancreas-mr",
    "mr_head_philips_enhanced": "pancreas-mr",
    "mr_head_siemens_t1sag": "pancreas-mr",
}
REFUSED_4D = "mr_head_ge_epi4d"
# The Philips enhanced file is the classic series' acquisition in one multi-frame object,
# under the same SeriesInstanceUID: sent as is, the two would be one series of duplicates.
OWN_SERIES_UID = {"mr_head_philips_enhanced"}
SEG, GSPS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass
class Run:
    node: NodeProc
    received: list[pydicom.Dataset]  # everything the PACS got
    series_uid: dict[str, str]  # data folder -> SeriesInstanceUID


def _series_files(name: str, tmp: Path) -> list[Path]:
    """The files of one shared series; those in OWN_SERIES_UID copied under a series UID
    of their own (the SOP instances keep theirs)."""
    files = sorted(p for p in dicom_series_dir(name).glob("*") if p.is_file())
    if name not in OWN_SERIES_UID:
        return files
    out = tmp / name
    out.mkdir()
    series = generate_uid(entropy_srcs=["ainode-test", name, "series"])
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.save_as(out / f.name, enforce_file_format=True)
    return sorted(out.iterdir())


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _jobs(node: NodeProc) -> dict[str, Job]:
    db = node.db
    try:
        with db.session() as s:
            rows = s.execute(sa.select(Series.series_instance_uid, Job).join(Job.series)).all()
            s.expunge_all()
            return dict(rows)  # type: ignore[arg-type]
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("not-assessable")
    sink_dir = tmp / "sink"
    with store_scp(sink_dir, SINK_AET) as sink_port:
        node = start_node(tmp, workers=1, callers=["STORESCU"], extra={
            "destinations": [{"name": "pacs", "ae_title": SINK_AET, "host": "127.0.0.1",
                              "port": sink_port, "accepts": ["SEG", "SR", "GSPS"]}]})
        try:
            for name, modality, pipeline in (("head-ct", "CT", "pancreas-ct"),
                                             ("head-mr", "MR", "pancreas-mr")):
                add = node.ainode("rules", "add", name, "--when", f"Modality={modality}",
                                  "--pipeline", pipeline, "--send-to", "pacs")
                assert add.returncode == 0, add.stdout + add.stderr
            names = [*NOT_ABDOMINAL, REFUSED_4D]
            uids = {}
            for name in names:
                files = _series_files(name, tmp)
                uids[name] = _series_uid(files)
                sent = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                                       "-xv", "127.0.0.1", str(node.port), *map(str, files)],
                                      env=dcmtk_env(), capture_output=True, text=True,
                                      timeout=300)
                assert sent.returncode == 0, sent.stdout + sent.stderr
            assert len(set(uids.values())) == len(names)

            def finished() -> dict[str, Job] | None:
                jobs = _jobs(node)
                done = [j for j in jobs.values() if j.state in (JobState.DONE, JobState.FAILED)]
                return jobs if len(done) == len(names) else None

            wait_for(finished, timeout=900, interval=2, what="a finished job for every series")

            def all_sent() -> list[pydicom.Dataset] | None:
                got = [pydicom.dcmread(p) for p in sink_dir.rglob("*") if p.is_file()]
                return got if len(got) >= len(NOT_ABDOMINAL) else None

            received = wait_for(all_sent, timeout=180, what="an SR per series at the PACS")
            yield Run(node, received, uids)
        finally:
            node.stop()


def _evidence_series(sr: pydicom.Dataset) -> set[str]:
    """The source series an SR names as its evidence."""
    return {str(s.SeriesInstanceUID)
            for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for s in study.get("ReferencedSeriesSequence", [])}




@pytest.mark.parametrize("name", sorted(NOT_ABDOMINAL))
def test_a_non_abdominal_series_is_not_assessable_with_a_reason_and_no_lesion(
        run: Run, name: str) -> None:
    uid = run.series_uid[name]
    job = _jobs(run.node)[uid]
    assert job.pipeline == NOT_ABDOMINAL[name]
    assert job.state == JobState.DONE, job.error
    assert job.outcome == JobOutcome.NOT_ASSESSABLE, job.provenance.get("summary")
    assert job.outcome_reason and job.outcome_reason.strip()

    db = run.node.db
    try:
        with db.session() as s:
            findings = list(s.scalars(sa.select(Finding).where(Finding.job_id == job.id)))
            kinds = sorted(s.scalars(sa.select(Output.kind).where(Output.job_id == job.id)))
            event = s.scalars(sa.select(AuditEvent).where(
                AuditEvent.event == "job.not_assessable", AuditEvent.job_id == job.id)).one()
    finally:
        db.dispose()
    assert [f.kind for f in findings if f.kind != "patient"] == []  # never a lesion row
    assert kinds == ["SR"]
    assert event.details["reason"] == job.outcome_reason and event.series_uid == uid

    for_series = [ds for ds in run.received if uid in _evidence_series(ds)]
    assert [str(ds.Modality) for ds in for_series] == ["SR"]  # no SEG, no GSPS at the PACS
    texts = sr_texts(for_series[0])
    assert f"Not assessable: {job.outcome_reason}" in texts, texts
    assert not any("lesion" in t.lower() for t in texts), texts


def test_a_4d_series_is_a_failed_input_job_naming_the_duplicate_positions(run: Run) -> None:
    job = _jobs(run.node)[run.series_uid[REFUSED_4D]]
    assert job.state == JobState.FAILED and job.attempts == 1  # bad input: not retried
    assert job.stage == "load" and job.outcome is None
    assert job.error is not None and "duplicate slice positions" in job.error
    assert not [ds for ds in run.received if run.series_uid[REFUSED_4D] in _evidence_series(ds)]


def test_nothing_the_pacs_received_is_a_lesion_object(run: Run) -> None:
    assert {str(ds.SOPClassUID) for ds in run.received} & {SEG, GSPS} == set()
    status = run.node.ainode("status", "--json")
    assert status.returncode == 0, status.stderr
    assert f'"not_assessable": {len(NOT_ABDOMINAL)}' in status.stdout
