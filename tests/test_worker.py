"""The job runner on real files: a real CT series from the spool, real volume loading and
real DICOM writers; only the AI model is replaced by the threshold pipeline below,
because the pancreas models are built in another issue (it is registered under its own
name, ``test-threshold``, never under a production pipeline's name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from node.config import NodeConfig
from node.jobs import JobDeps, run_job
from node.orchestration import record_turnaround
from node.worker import Worker
from pipelines import registry, results
from pipelines.results import AlgorithmInfo, AnalysisResult
from storage import jobs as job_store
from storage.db import Database
from storage.errors import GeometryError
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    Destination,
    Finding,
    Instance,
    Job,
    JobState,
    Output,
    RoutingRule,
    Series,
    Study,
    Transfer,
    utcnow,
)
from tests.support.data import dicom_series_dir
from tests.support.net import wait_for

SERIES = "ct_phantom_philips"
SLEEP_ENV = "AINODE_TEST_PIPELINE_SLEEP_S"

ANATOMY = results.Code("SCT", "91723000", "Anatomical Structure")
ORGAN = results.Code("SCT", "15776009", "Pancreas")
ABNORMAL = results.Code("SCT", "49755003", "Morphologically Abnormal Structure")
NEOPLASM = results.Code("SCT", "108369006", "Neoplasm")


class ThresholdPipeline:
    """Finds the brightest structure by a fixed HU threshold: deterministic, instant, no model.

    The sleep (from the environment of the test process) lets a test catch a job mid-run.
    """

    name = "test-threshold"
    min_slices = 3

    def __init__(self, *, models_dir: Path | None = None, device: str = "auto") -> None:
        self.models_dir, self.device = models_dir, device  # a factory's contract; unused

    def model_version(self) -> str:
        return "threshold-1"

    def run(self, volume: object) -> AnalysisResult:
        delay = float(os.environ.get(SLEEP_ENV, "0"))
        if delay:
            time.sleep(delay)
        arr = volume.array  # type: ignore[attr-defined]
        n = arr.shape[0]
        organ = np.zeros(arr.shape, bool)
        organ[n // 3: 2 * n // 3] = arr[n // 3: 2 * n // 3] > 0
        lesion = np.zeros(arr.shape, bool)
        lesion[n // 2, 240:260, 240:260] = True
        return AnalysisResult(
            pipeline=self.name,
            algorithm=AlgorithmInfo("ainode test-threshold", self.model_version()),
            source_sop_instance_uids=list(volume.sop_instance_uids),  # type: ignore[attr-defined]
            segments=[results.Segment("organ", "Organ", ANATOMY, ORGAN, organ),
                      results.Segment("lesion-1", "Lesion 1", ABNORMAL, NEOPLASM, lesion)],
            findings=[
                results.ScoredFinding("patient-level", "test score", results.PROBABILITY, 0.8),
                results.ScoredFinding("lesion-1", "lesion", results.PROBABILITY, 0.8,
                                      kind="lesion", segment="lesion-1", location="head",
                                      size_mm=20.0, volume_ml=0.5),
            ],
        )


class BrokenPipeline(ThresholdPipeline):
    name = "test-broken"

    def run(self, volume: object) -> AnalysisResult:
        raise GeometryError("the test pipeline refuses this volume")


registry.register("test-threshold")(ThresholdPipeline)
registry.register("test-broken")(BrokenPipeline)


def spool_series(db: Database, store: FileStore, name: str = SERIES, *,
                 state: str = "routed", received_ago_s: float = 0.0) -> int:
    """Put a real series in the spool and its rows in the database, as the receiver would."""
    files = sorted(dicom_series_dir(name).glob("*.dcm"))
    with db.session() as s:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        study = Study(study_instance_uid=str(first.StudyInstanceUID))
        when = utcnow() - timedelta(seconds=received_ago_s)
        series = Series(series_instance_uid=str(first.SeriesInstanceUID), study=study,
                        modality="CT", state=state, instance_count=len(files),
                        series_description=str(first.get("SeriesDescription", "")),
                        last_received_at=when, first_received_at=when)
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


def queue_job(db: Database, series_id: int, pipeline: str = "test-threshold", *,
              shadow: bool = True, destinations: list[str] | None = None) -> int:
    with db.session() as s:
        rule = RoutingRule(name=f"rule-{pipeline}", version=1, pipeline=pipeline,
                           conditions=[], destinations=destinations or [], shadow=shadow)
        s.add(rule)
        s.flush()
        req = job_store.JobRequest(pipeline=pipeline, model_version="threshold-1", rule=rule,
                                   shadow=shadow)
        job, _ = job_store.ensure_job(s, s.get_one(Series, series_id), req)
        return job.id


def job_deps(db: Database, store: FileStore) -> JobDeps:
    """What another runner than Worker (a task queue) hands run_job."""
    return JobDeps(db, store, NodeConfig(storage={"data_dir": store.data_dir}), device="cpu")


def make_worker(db: Database, store: FileStore, **kw: object) -> Worker:
    config = NodeConfig(storage={"data_dir": store.data_dir})
    return Worker(db, store, config, lease_s=kw.pop("lease_s", 30.0), **kw)  # type: ignore[arg-type]


def test_job_writes_outputs_and_findings_once(sqlite_db: Database, filestore: FileStore) -> None:
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))
    worker = make_worker(sqlite_db, filestore)
    assert worker.run_once() == job_id
    assert worker.run_once() is None  # nothing left: the same job never runs twice
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        assert job.stage == "done" and job.attempts == 1 and job.finished_at is not None
        assert job.provenance["pipeline_model_version"] == "threshold-1"
        outputs = list(s.scalars(select(Output).where(Output.job_id == job_id)))
        assert sorted(o.kind for o in outputs) == ["GSPS", "SEG", "SR"]
        for out in outputs:
            ds = pydicom.dcmread(filestore.result_path(out.path))
            assert str(ds.SOPInstanceUID) == out.sop_instance_uid
            assert str(ds.StudyInstanceUID) == job.series.study.study_instance_uid
        findings = {f.kind: f for f in s.scalars(select(Finding).where(Finding.job_id == job_id))}
        assert findings["patient"].probability == pytest.approx(0.8)
        assert findings["lesion"].location == "head"
        # shadow: results recorded, nothing queued for sending
        assert s.scalar(select(func.count()).select_from(Transfer)) == 0
    assert record_turnaround(sqlite_db) == 1
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.turnaround_s is not None and job.turnaround_s > 0


def test_bad_input_fails_with_stage_and_error_without_retry(
        sqlite_db: Database, filestore: FileStore) -> None:
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore), "test-broken")
    assert make_worker(sqlite_db, filestore).run_once() == job_id
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.FAILED and job.attempts == 1
        assert job.stage == "infer" and "refuses this volume" in (job.error or "")
        assert s.scalar(select(func.count()).select_from(Output)) == 0
        failed = s.scalars(select(AuditEvent).where(AuditEvent.event == "job.failed")).one()
        assert failed.job_id == job_id and failed.details["stage"] == "infer"


def test_missing_instances_fail_the_job(sqlite_db: Database, filestore: FileStore) -> None:
    series_id = spool_series(sqlite_db, filestore)
    job_id = queue_job(sqlite_db, series_id)
    with sqlite_db.session() as s:  # the files are gone (a disk lost, a manual delete)
        for inst in s.scalars(select(Instance)):
            filestore.spool_path(inst.path).unlink()
    make_worker(sqlite_db, filestore).run_once()
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.FAILED and job.stage == "load", job.error


def test_time_limit_fails_the_job(sqlite_db: Database, filestore: FileStore,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The limit must outlast planning and loading (first imports included) on a busy
    # 2-core machine, so that the job is stopped in "infer", the stage asserted below.
    monkeypatch.setenv(SLEEP_ENV, "6")
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))
    worker = make_worker(sqlite_db, filestore, lease_s=0.3, job_timeout_s=2.0)
    t0 = time.monotonic()
    assert worker.run_once() == job_id
    assert time.monotonic() - t0 < 30
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.FAILED and "time limit" in (job.error or "")
        assert job.stage == "infer"
        # the late result of the timed-out run was refused
        assert s.scalar(select(func.count()).select_from(Output)) == 0


WORKER_SCRIPT = """
import sys
import tests.test_worker as tw
from storage.db import Database
from storage.filestore import FileStore
db = Database(sys.argv[1])
store = FileStore(__import__('pathlib').Path(sys.argv[2]))
tw.make_worker(db, store).run_available()
"""


def test_sigkill_mid_job_then_restart_completes_exactly_once(
        sqlite_db: Database, filestore: FileStore) -> None:
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))
    env = {**os.environ, SLEEP_ENV: "60"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, sqlite_db.url,
                             str(filestore.data_dir)], env=env,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        def in_inference() -> bool:
            with sqlite_db.session() as s:
                return s.get_one(Job, job_id).stage == "infer"

        wait_for(in_inference, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with sqlite_db.session() as s:
        assert s.get_one(Job, job_id).state == JobState.RUNNING  # orphaned by the kill
    restarted = make_worker(sqlite_db, filestore)
    assert restarted.recover() == [job_id]  # its pid is dead: no need to wait for the lease
    assert restarted.run_available() == 1
    assert restarted.run_available() == 0
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE and job.attempts == 2
        assert s.scalar(select(func.count()).select_from(Output)) == 3
        assert s.scalar(select(func.count()).select_from(Finding)) == 2
        events = [e.event for e in s.scalars(select(AuditEvent).where(
            AuditEvent.job_id == job_id).order_by(AuditEvent.id))]
    assert events == ["job.created", "job.started", "job.requeued", "job.started", "job.done"]


def test_live_rule_queues_transfers_for_the_kinds_its_destination_accepts(
        sqlite_db: Database, filestore: FileStore) -> None:
    with sqlite_db.session() as s:
        s.add(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                          accepts=["SEG", "SR"]))
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore), shadow=False,
                       destinations=["pacs"])
    assert make_worker(sqlite_db, filestore).run_once() == job_id
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        kinds = sorted(s.scalars(select(Output.kind).where(Output.job_id == job_id)))
        assert kinds == ["SEG", "SR"]  # GSPS: nobody would receive it, so not written
        transfers = list(s.scalars(select(Transfer)))
        assert len(transfers) == 2 and {t.state for t in transfers} == {"pending"}
    assert record_turnaround(sqlite_db) == 0  # not delivered until every transfer is accepted


def test_run_job_is_a_plain_function_after_any_claim(
        sqlite_db: Database, filestore: FileStore) -> None:
    """What another runner (a task queue) does: claim under its own name, call run_job."""
    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))
    assert job_store.claim_next(sqlite_db, "task-7", lease_s=60) == job_id
    stages: list[str] = []
    outcome = run_job(job_id, "task-7", job_deps(sqlite_db, filestore), on_stage=stages.append)
    assert stages == ["load", "infer", "write", "save"]
    assert outcome.job_id == job_id and outcome.model_version == "threshold-1"
    assert sorted(outcome.outputs) == ["GSPS", "SEG", "SR"] and not outcome.queued
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE and job.provenance["claimed_by"] == "task-7"
        assert job.provenance["device"] == "cpu"


def test_run_job_without_the_claim_saves_nothing(
        sqlite_db: Database, filestore: FileStore) -> None:
    from storage.errors import JobNotHeldError

    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))
    assert job_store.claim_next(sqlite_db, "holder", lease_s=60) == job_id
    with pytest.raises(JobNotHeldError):
        run_job(job_id, "intruder", job_deps(sqlite_db, filestore))
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.RUNNING and job.worker == "holder"
        assert job.stage == "claimed"  # the intruder's stages were not recorded either
        assert s.scalar(select(func.count()).select_from(Output)) == 0


def test_a_job_cancelled_mid_run_keeps_its_state_and_no_result(
        sqlite_db: Database, filestore: FileStore) -> None:
    from node.jobs.run import default_write

    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))

    def cancel_then_write(*args: Any) -> Any:
        with sqlite_db.session() as s:
            job_store.cancel_job(s, job_id, actor="admin")
        return default_write(*args)

    assert make_worker(sqlite_db, filestore, write=cancel_then_write).run_once() == job_id
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.CANCELLED and job.error is None
        assert s.scalar(select(func.count()).select_from(Output)) == 0
        assert s.scalar(select(func.count()).select_from(Finding)) == 0


def test_a_conflict_that_is_not_about_holding_the_job_fails_it(
        sqlite_db: Database, filestore: FileStore) -> None:
    """Only JobNotHeldError means "not held"; any other conflict is the job's failure."""
    from storage.errors import ConflictError

    job_id = queue_job(sqlite_db, spool_series(sqlite_db, filestore))

    def clash(*_: Any) -> Any:
        raise ConflictError("a different object under an existing UID")

    assert make_worker(sqlite_db, filestore, write=clash).run_once() == job_id
    with sqlite_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.QUEUED and job.attempts == 1  # retryable
        assert job.stage == "write" and "existing UID" in (job.error or "")
        retry = s.scalars(select(AuditEvent).where(AuditEvent.event == "job.retry")).one()
        assert retry.job_id == job_id
