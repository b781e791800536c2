"""The sender against a real PACS (Orthanc on loopback): round trip, retries, backoff.

Orthanc is started by the tests; the source series is uploaded to it first
(REST), then the node's sender delivers SEG, SR, GSPS and SC over DICOM and
Orthanc's REST API must show them in the same study.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.config import DestinationConfig, NodeConfig
from node.send import RetryPolicy, echo, queue_outputs, send_due
from pipelines.dicom_out import write_results
from storage import destinations
from storage.db import Database
from storage.errors import InputError, TransferError
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    Job,
    Output,
    Series,
    Study,
    Transfer,
    TransferState,
    utcnow,
)
from tests.support.data import dicom_series_dir
from tests.support.net import free_port
from tests.support.peers import orthanc
from tests.test_dicom_out_writers import load_sorted, make_result

pytestmark = pytest.mark.peers

ALL = ["SEG", "SR", "GSPS", "SC"]


def store_outputs(db: Database, fs: FileStore, sources: Sequence[pydicom.Dataset]
                  ) -> list[Output]:
    """What the job runner does after a pipeline run: write, save, record Output rows."""
    objs = write_results(make_result(sources).to_result(), sources, ALL)
    with db.session() as s:
        study = Study(study_instance_uid=str(sources[0].StudyInstanceUID))
        series = Series(series_instance_uid=str(sources[0].SeriesInstanceUID), study=study)
        job = Job(series=series, pipeline="pancreas-ct")
        s.add_all([study, series, job])
        s.flush()
        outputs = []
        for obj in objs:
            buf = io.BytesIO()
            obj.dataset.save_as(buf, enforce_file_format=True)
            uid = str(obj.dataset.SOPInstanceUID)
            stored = fs.write_result(job.id, obj.kind, uid, buf.getvalue())
            out = Output(job_id=job.id, kind=obj.kind, sop_class_uid=str(obj.dataset.SOPClassUID),
                         sop_instance_uid=uid,
                         series_instance_uid=str(obj.dataset.SeriesInstanceUID),
                         path=stored.relpath)
            s.add(out)
            outputs.append(out)
        s.flush()
        for o in outputs:
            s.expunge(o)
    return outputs


def add_destination(db: Database, name: str, port: int, ae: str = "ORTHANC",
                    accepts: Sequence[str] = tuple(ALL)) -> None:
    with db.session() as s:
        destinations.add(s, DestinationConfig(name=name, ae_title=ae, host="127.0.0.1",
                                              port=port, accepts=list(accepts)))  # type: ignore[arg-type]


def queue(db: Database, outputs: Sequence[Output], names: Sequence[str]) -> int:
    with db.session() as s:
        outs = list(s.scalars(select(Output).where(Output.id.in_([o.id for o in outputs]))))
        return len(queue_outputs(s, outs, names))


def upload_sources(server: object, folder: Path) -> None:
    for f in sorted(folder.glob("*.dcm")):
        server.post("/instances", f.read_bytes())  # type: ignore[attr-defined]


def transfers(db: Database) -> list[Transfer]:
    with db.session() as s:
        rows = list(s.scalars(select(Transfer).order_by(Transfer.id)))
        for r in rows:
            s.expunge(r)
        return rows


def events(db: Database, event: str) -> list[AuditEvent]:
    with db.session() as s:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.event == event)
                              .order_by(AuditEvent.id)))
        for r in rows:
            s.expunge(r)
        return rows


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return load_sorted("ct_phantom_philips")


def test_orthanc_round_trip_all_four_kinds(sqlite_db: Database, filestore: FileStore,
                                           sources: list[pydicom.Dataset],
                                           tmp_path: Path) -> None:
    outputs = store_outputs(sqlite_db, filestore, sources)
    with orthanc(tmp_path / "orthanc") as pacs:
        upload_sources(pacs, dicom_series_dir("ct_phantom_philips"))
        add_destination(sqlite_db, "pacs", pacs.dicom_port)
        assert queue(sqlite_db, outputs, ["pacs"]) == len(outputs)
        with sqlite_db.session() as s:
            assert echo(destinations.by_name(s, "pacs"))  # type: ignore[arg-type]
        report = send_due(sqlite_db, filestore, NodeConfig())
        assert (report.sent, report.retrying, report.failed) == (len(outputs), 0, 0)
        studies = pacs.get("/studies")
        assert len(studies) == 1  # everything landed in the source study
        study = pacs.get(f"/studies/{studies[0]}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == sources[0].StudyInstanceUID
        modalities = sorted(pacs.get(f"/series/{sid}")["MainDicomTags"].get("Modality", "")
                            for sid in study["Series"])
        assert modalities == ["CT", "OT", "PR", "SEG", "SR"]
        sop_uids = {pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                    for i in pacs.instances()}
        assert {o.sop_instance_uid for o in outputs} <= sop_uids
    rows = transfers(sqlite_db)
    assert all(t.state == TransferState.SENT and t.last_status == 0 and t.attempts == 1
               for t in rows)
    assert len(events(sqlite_db, "transfer.sent")) == len(outputs)


def test_destination_gets_only_the_kinds_it_accepts(sqlite_db: Database, filestore: FileStore,
                                                    sources: list[pydicom.Dataset]) -> None:
    outputs = store_outputs(sqlite_db, filestore, sources)
    add_destination(sqlite_db, "sr-only", free_port(), accepts=["SR"])
    assert queue(sqlite_db, outputs, ["sr-only"]) == 1
    assert queue(sqlite_db, outputs, ["sr-only"]) == 1  # idempotent
    assert len(transfers(sqlite_db)) == 1
    with pytest.raises(InputError, match="unknown or disabled destination"):
        queue(sqlite_db, outputs, ["nope"])


def test_down_then_refusing_then_back_retried_with_backoff(
        any_db: Database, filestore: FileStore, sources: list[pydicom.Dataset],
        tmp_path: Path) -> None:
    """One destination down (then refusing) while another works; it succeeds once back."""
    outputs = store_outputs(any_db, filestore, sources)
    n = len(outputs)
    flaky_port = free_port()
    policy = RetryPolicy(base_s=30, ceiling_s=3600, max_attempts=10)
    cfg = NodeConfig()
    with orthanc(tmp_path / "good") as good:
        add_destination(any_db, "good", good.dicom_port)
        add_destination(any_db, "flaky", flaky_port)
        queue(any_db, outputs, ["good", "flaky"])
        t0 = utcnow()
        # 1. "flaky" is down (nothing listening): retried, and "good" is not held up.
        r1 = send_due(any_db, filestore, cfg, now=t0, policy=policy)
        assert r1.per_destination["good"]["sent"] == n
        assert r1.per_destination["flaky"]["retrying"] == n
        assert len(good.instances()) == n
    flaky = [t for t in transfers(any_db) if t.state != TransferState.SENT]
    assert len(flaky) == n
    assert all(t.attempts == 1 and t.next_attempt_at == t0 + timedelta(seconds=30)
               for t in flaky)
    # Not due yet: nothing is tried.
    r = send_due(any_db, filestore, cfg, now=t0 + timedelta(seconds=29), policy=policy)
    assert (r.sent, r.retrying) == (0, 0)
    # 2. It comes up but refuses the association (wrong called AE): backoff doubles.
    t1 = t0 + timedelta(seconds=30)
    with orthanc(tmp_path / "refusing", aet="NOTYOU",
                 extra_config={"DicomPort": flaky_port, "DicomCheckCalledAet": True}):
        r2 = send_due(any_db, filestore, cfg, now=t1, policy=policy)
    assert r2.per_destination["flaky"]["retrying"] == n
    flaky = [t for t in transfers(any_db) if t.state != TransferState.SENT]
    assert all(t.attempts == 2 and t.next_attempt_at == t1 + timedelta(seconds=60)
               and "rejected" in (t.error or "") for t in flaky)
    # 3. Back for real: sent.
    t2 = t1 + timedelta(seconds=60)
    with orthanc(tmp_path / "back", extra_config={"DicomPort": flaky_port}) as back:
        r3 = send_due(any_db, filestore, cfg, now=t2, policy=policy)
        assert r3.per_destination["flaky"]["sent"] == n
        assert len(back.instances()) == n
    assert all(t.state == TransferState.SENT for t in transfers(any_db))
    # The audit log tells the story, per SOP instance.
    retries = events(any_db, "transfer.retry")
    assert len(retries) == 2 * n
    assert {e.details["attempt"] for e in retries} == {1, 2}
    assert all(e.details["destination"] == "flaky" and e.outcome == "failure" for e in retries)
    assert any("connection refused" in e.details["error"] for e in retries)
    assert any("rejected" in e.details["error"] for e in retries)
    sent = events(any_db, "transfer.sent")
    assert len(sent) == 2 * n
    assert sorted(e.details["attempt"] for e in sent if e.details["destination"] == "flaky") \
        == [3] * n
    assert {e.sop_instance_uid for e in sent} == {o.sop_instance_uid for o in outputs}


def test_gives_up_after_max_attempts(sqlite_db: Database, filestore: FileStore,
                                     sources: list[pydicom.Dataset]) -> None:
    outputs = store_outputs(sqlite_db, filestore, sources)[:1]
    add_destination(sqlite_db, "dead", free_port())
    queue(sqlite_db, outputs, ["dead"])
    policy = RetryPolicy(base_s=1, ceiling_s=2, max_attempts=3)
    now = utcnow()
    for _ in range(3):
        send_due(sqlite_db, filestore, NodeConfig(), now=now, policy=policy)
        now += timedelta(seconds=10)
    (t,) = transfers(sqlite_db)
    assert t.state == TransferState.FAILED and t.attempts == 3
    assert [e.event for e in events(sqlite_db, "transfer.failed")] == ["transfer.failed"]


def test_backoff_doubles_up_to_the_ceiling() -> None:
    p = RetryPolicy(base_s=30, ceiling_s=300)
    assert [p.delay(a).total_seconds() for a in range(1, 7)] == [30, 60, 120, 240, 300, 300]


def test_echo_unreachable_raises(sqlite_db: Database) -> None:
    add_destination(sqlite_db, "nobody", free_port())
    with sqlite_db.session() as s, pytest.raises(TransferError, match="nobody"):
        echo(destinations.by_name(s, "nobody"))  # type: ignore[arg-type]
