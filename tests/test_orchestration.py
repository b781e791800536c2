"""The periodic tasks on real databases and files, and their wiring into APScheduler."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from node.config import NodeConfig
from node.orchestration import (
    Services,
    clean_spool,
    close_series,
    register_tasks,
    route_series,
)
from node.routing import RuleSpec
from node.routing import store as rule_store
from node.worker import Worker
from storage import jobs as job_store
from storage.db import Database
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    Destination,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    Study,
    Transfer,
    utcnow,
)
from tests.support.data import dicom_series_dir
from tests.support.net import wait_for
from tests.test_worker import spool_series

ROOT = "1.2.826.0.1.3680043.10.998"


def services(db: Database, store: FileStore, retention_days: float = 30.0) -> Services:
    config = NodeConfig(storage={"data_dir": store.data_dir, "min_free_mb": 0,
                                 "retention_days": retention_days},
                        series={"stable_age_s": 10})
    return Services(config=config, db=db, store=store, model_version_of=lambda p: f"{p}-v1")


def add_rule(db: Database, *when: str, name: str = "abdomen-ct", pipeline: str = "pancreas-ct",
             **kw: Any) -> None:
    with db.session() as s:
        rule_store.add_rule(s, RuleSpec.build(name, pipeline=pipeline, when=when, **kw),
                            actor="test", pipelines=[pipeline])


def add_series(db: Database, n: int, *, state: SeriesState = SeriesState.COMPLETE,
               ago_s: float = 60.0, **attrs: Any) -> str:
    uid = f"{ROOT}.2.{n}"
    with db.session() as s:
        study = s.scalars(select(Study)).first() or Study(study_instance_uid=f"{ROOT}.1")
        when = utcnow() - timedelta(seconds=ago_s)
        s.add(Series(series_instance_uid=uid, study=study, modality=attrs.pop("Modality"),
                     series_description=attrs.pop("SeriesDescription", None), state=state,
                     instance_count=attrs.pop("instance_count", 1),
                     last_received_at=when, first_received_at=when, attributes=attrs))
    return uid


def jobs_of(db: Database, uid: str) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).join(Series).where(Series.series_instance_uid == uid)))


def state_of(db: Database, uid: str) -> SeriesState:
    with db.session() as s:
        return s.scalars(select(Series.state).where(Series.series_instance_uid == uid)).one()


def events(db: Database, uid: str) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent.event).where(AuditEvent.series_uid == uid)
                              .order_by(AuditEvent.id)))


def test_routing_creates_one_job_per_matched_rule_and_records_unmatched(
        any_db: Database, filestore: FileStore) -> None:
    svc = services(any_db, filestore)
    add_rule(any_db, "Modality=CT", "SeriesDescription~abd|portal", "SliceThickness<=3",
             priority=10)
    add_rule(any_db, "Modality=CT", name="ct-shadow", shadow=True)
    ct = add_series(any_db, 1, Modality="CT", SeriesDescription="Abdomen portal",
                    SliceThickness=2.0)
    mr = add_series(any_db, 2, Modality="MR", SeriesDescription="Head T1")
    outcomes = {o.series_uid: o for o in route_series(svc)}
    assert len(outcomes[ct].jobs_created) == 2 and outcomes[mr].jobs_created == ()
    jobs = sorted(jobs_of(any_db, ct), key=lambda j: -j.priority)
    assert [(j.rule_key, j.pipeline, j.model_version, j.priority, j.shadow) for j in jobs] == [
        ("abdomen-ct@v1", "pancreas-ct", "pancreas-ct-v1", 10, False),
        ("ct-shadow@v1", "pancreas-ct", "pancreas-ct-v1", 0, True)]
    assert state_of(any_db, ct) == state_of(any_db, mr) == SeriesState.ROUTED
    # the unmatched series is recorded with the reason, and not processed
    assert jobs_of(any_db, mr) == []
    with any_db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.event == "series.unrouted")).one()
    assert ev.series_uid == mr
    assert ev.details["rules"]["abdomen-ct"].startswith("Modality=CT: 'MR' does not equal")
    assert route_series(svc) == []  # nothing left to route

    # The same study sent again: ingest reopens the series, it completes again.
    with any_db.session() as s:
        s.scalars(select(Series).where(Series.series_instance_uid == ct)).one().state = \
            SeriesState.COMPLETE
    (again,) = route_series(svc)
    assert again.jobs_created == () and len(again.jobs_existing) == 2
    assert len(jobs_of(any_db, ct)) == 2
    assert events(any_db, ct) == ["series.routed", "job.created", "job.created", "series.routed"]


def test_per_rule_stable_age(sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore)  # global stable age 10 s
    add_rule(sqlite_db, "Modality=CT", name="slow", stable_age_s=600)
    add_rule(sqlite_db, "Modality=MR", name="fast", pipeline="pancreas-mr", stable_age_s=2)
    ct = add_series(sqlite_db, 1, Modality="CT", ago_s=60)
    mr = add_series(sqlite_db, 2, Modality="MR", state=SeriesState.RECEIVING, ago_s=5)
    other = add_series(sqlite_db, 3, Modality="US", state=SeriesState.RECEIVING, ago_s=5)
    outcomes = {o.series_uid: o for o in route_series(svc)}
    assert outcomes[ct].deferred and state_of(sqlite_db, ct) == SeriesState.COMPLETE
    assert len(outcomes[mr].jobs_created) == 1 and state_of(sqlite_db, mr) == SeriesState.ROUTED
    # a receiving series no rule wants waits for the global stable age
    assert state_of(sqlite_db, other) == SeriesState.RECEIVING and jobs_of(sqlite_db, other) == []
    later = {o.series_uid: o for o in route_series(svc, now=utcnow() + timedelta(seconds=600))}
    assert len(later[ct].jobs_created) == 1 and state_of(sqlite_db, ct) == SeriesState.ROUTED


def test_a_keyword_not_stored_is_read_from_the_spooled_header(
        sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore)
    add_rule(sqlite_db, "Modality=CT", "ContrastBolusAgent=applied", "KVP>=100")
    uid = add_series(sqlite_db, 1, Modality="CT")  # no ContrastBolusAgent/KVP stored
    src = sorted(dicom_series_dir("ct_abdomen_siemens").glob("*.dcm"))[0]
    sop = str(pydicom.dcmread(src, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
    stored = filestore.write_instance(f"{ROOT}.1", uid, sop, [src.read_bytes()])
    with sqlite_db.session() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        s.add(Instance(sop_instance_uid=sop, series=series,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       transfer_syntax_uid="1.2.840.10008.1.2.4.90", path=stored.relpath,
                       size_bytes=stored.size, sha256=stored.sha256))
    (outcome,) = route_series(svc)
    assert len(outcome.jobs_created) == 1, [e.explain() for e in outcome.evaluations]


def test_series_received_while_down_is_completed_and_routed(
        sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore)
    add_rule(sqlite_db, "Modality=CT")
    uid = add_series(sqlite_db, 1, Modality="CT", state=SeriesState.RECEIVING, ago_s=3600)
    assert close_series(svc) == 1
    (outcome,) = route_series(svc)
    assert len(outcome.jobs_created) == 1
    assert events(sqlite_db, uid) == ["series.completed", "series.routed", "job.created"]


def test_spool_retention_never_deletes_unfinished_work(
        sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore, retention_days=1)
    old = 3 * 86400
    uids = {name: add_series(sqlite_db, i, Modality="CT", state=st, ago_s=age)
            for i, (name, st, age) in enumerate([
                ("done", SeriesState.ROUTED, old), ("queued", SeriesState.ROUTED, old),
                ("sending", SeriesState.ROUTED, old), ("unrouted", SeriesState.COMPLETE, old),
                ("recent", SeriesState.ROUTED, 3600)])}
    with sqlite_db.session() as s:
        dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
        for name, uid in uids.items():
            series = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
            sop = f"{uid}.1"
            stored = filestore.write_instance(f"{ROOT}.1", uid, sop, [b"x" * 10])
            s.add(Instance(sop_instance_uid=sop, series=series, sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", path=stored.relpath,
                           size_bytes=10, sha256=stored.sha256))
            if name in ("done", "queued", "sending"):
                state = JobState.QUEUED if name == "queued" else JobState.DONE
                job = Job(series=series, rule_key=name, pipeline="pancreas-ct", state=state)
                s.add(job)
                if name == "sending":
                    out = Output(job=job, kind="SR", sop_class_uid="1.2", path="x",
                                 sop_instance_uid=f"{uid}.9", series_instance_uid=f"{uid}.8")
                    s.add(Transfer(output=out, destination=dest))
    assert clean_spool(svc) == [uids["done"]]
    assert not (filestore.spool / f"{ROOT}.1" / uids["done"]).exists()
    for name in ("queued", "sending", "unrouted", "recent"):
        assert (filestore.spool / f"{ROOT}.1" / uids[name] / f"{uids[name]}.1.dcm").exists()
    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4
    assert events(sqlite_db, uids["done"]) == ["series.purged"]
    assert clean_spool(svc) == []


@pytest.mark.slow
def test_scheduler_drives_a_series_from_arrival_to_done(
        sqlite_db: Database, filestore: FileStore, tmp_path: Path) -> None:
    """APScheduler runs the registered tasks: close -> route -> dispatch (in-process worker)
    -> turnaround. The model is the test threshold pipeline (see tests/test_worker.py)."""
    svc = services(sqlite_db, filestore)
    svc.model_version_of = lambda p: "threshold-1"
    add_rule(sqlite_db, "Modality=CT", name="phantom", pipeline="test-threshold", shadow=True)
    series_id = spool_series(sqlite_db, filestore, state="receiving", received_ago_s=3600)
    svc.worker = Worker(sqlite_db, filestore, svc.config, lease_s=30)
    scheduler = BackgroundScheduler(timezone="UTC")
    ids = register_tasks(scheduler, svc, {k: 0.2 for k in (
        "close_series", "route_series", "dispatch_jobs", "send_results", "clean_spool")})
    assert len(ids) == 5
    scheduler.start()
    try:
        def delivered() -> Job | None:
            with sqlite_db.session() as s:
                job = s.scalars(select(Job).where(Job.series_id == series_id)).first()
                return job if job is not None and job.turnaround_s is not None else None

        job = wait_for(delivered, timeout=120, what="job done and delivered")
    finally:
        scheduler.shutdown(wait=True)
    assert job.state == JobState.DONE and job.turnaround_s is not None
    assert job.turnaround_s >= 3600  # measured from the last instance received
    with sqlite_db.session() as s:
        uid = s.get_one(Series, series_id).series_instance_uid
        assert s.scalar(select(func.count()).select_from(Job)) == 1
    assert events(sqlite_db, uid)[:3] == ["series.completed", "series.routed", "job.created"]
    assert job_store.requeue_expired(sqlite_db) == []


def test_the_node_service_completes_series_with_the_one_close_series(
        data_dir: Path) -> None:
    """NodeService schedules orchestration's close_series on its own tick; it has no other."""
    from node.service import NodeService
    from tests.support.net import free_port

    config = NodeConfig(dicom={"host": "127.0.0.1", "port": free_port()},
                        storage={"data_dir": data_dir, "min_free_mb": 0},
                        series={"stable_age_s": 10})
    service = NodeService(config, workers=1, completion_interval_s=0.2, run_jobs=False)
    assert not hasattr(service, "complete_series")
    service.start()
    try:
        ids = {job.id for job in service.scheduler.get_jobs()}
        assert "ainode.close_series" in ids and "series-completion" not in ids
        close = service.scheduler.get_job("ainode.close_series")
        assert close.trigger.interval.total_seconds() == pytest.approx(0.2)
        uid = add_series(service.db, 1, Modality="CT", state=SeriesState.RECEIVING, ago_s=3600)
        wait_for(lambda: state_of(service.db, uid) != SeriesState.RECEIVING, timeout=30,
                 what="the quiet series to complete")
        assert events(service.db, uid)[0] == "series.completed"
    finally:
        service.stop(grace_s=1)


# -- series that are no image to analyse -----------------------------------------------------

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _variant(src: Path, series_uid: str, k: int, **changes: Any) -> pydicom.Dataset:
    """A copy of a real CT slice in another series, with ``changes`` applied."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = f"{series_uid}.{k}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _secondary_capture(src: Path, series_uid: str, k: int) -> pydicom.Dataset:
    """An "exam summary" screenshot made from a real CT slice, as a scanner console makes one."""
    import highdicom as hd
    import numpy as np

    ref = pydicom.dcmread(src)
    pixels = ref.pixel_array.astype(np.float32)
    grey = ((pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0) * 255).astype(np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref, grey, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),
        series_instance_uid=series_uid, series_number=99,
        sop_instance_uid=f"{series_uid}.{k}", instance_number=k, manufacturer="console")
    sc.Modality = "CT"  # consoles label their summaries with the scanner's modality
    return sc


def _ingest(db: Database, store: FileStore, datasets: list[pydicom.Dataset]) -> None:
    """Through the receiver's own path (fast header scan, stored routing attributes)."""
    from io import BytesIO

    from storage.ingest import Ingestor, Peer

    ingestor = Ingestor(db, store)
    try:
        for ds in datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ingestor.ingest(buf.getvalue(), peer=Peer("MODALITY", "127.0.0.1"),
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    finally:
        ingestor.close()


def _series(db: Database, uid: str) -> Series:
    with db.session() as s:
        return s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()


def _skipped_event(db: Database, uid: str) -> AuditEvent:
    with db.session() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.series_uid == uid,
                                                  AuditEvent.event == "series.skipped")).one()


def test_localizer_secondary_capture_derived_and_colour_series_are_skipped_with_a_reason(
        sqlite_db: Database, filestore: FileStore) -> None:
    """Made from a real CT file and received the receiver's way: each is routed with no job
    and its reason on the series row and in a ``series.skipped`` audit event, never a
    failed job; the unchanged CT beside them gets its job."""
    src = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[:2]
    made = {
        "ct": [_variant(f, f"{ROOT}.5.1", k) for k, f in enumerate(src, 1)],
        "localizer": [_variant(f, f"{ROOT}.5.2", k, ImageType=["ORIGINAL", "PRIMARY",
                                                               "LOCALIZER"])
                      for k, f in enumerate(src, 1)],
        "sc": [_secondary_capture(f, f"{ROOT}.5.3", k) for k, f in enumerate(src, 1)],
        "derived": [_variant(f, f"{ROOT}.5.4", k, ImageType=["DERIVED", "SECONDARY", "MPR"])
                    for k, f in enumerate(src, 1)],
        "colour": [_variant(f, f"{ROOT}.5.5", k, PhotometricInterpretation="YBR_FULL")
                   for k, f in enumerate(src, 1)],
    }
    _ingest(sqlite_db, filestore, [ds for group in made.values() for ds in group])
    add_rule(sqlite_db, "Modality=CT")
    svc = services(sqlite_db, filestore)
    assert close_series(svc, now=utcnow() + timedelta(seconds=60)) == len(made)
    outcomes = {o.series_uid: o for o in route_series(svc, now=utcnow() + timedelta(seconds=60))}
    uid = {name: group[0].SeriesInstanceUID for name, group in made.items()}

    assert len(outcomes[uid["ct"]].jobs_created) == 1
    assert _series(sqlite_db, uid["ct"]).skip_reason is None
    expected = {"localizer": ("localizer", "ImageType ORIGINAL\\PRIMARY\\LOCALIZER"),
                "sc": ("secondary capture", SC_CLASS),
                "derived": ("derived", "ImageType DERIVED\\SECONDARY\\MPR"),
                "colour": ("colour", "PhotometricInterpretation YBR_FULL")}
    for name, (kind, words) in expected.items():
        series = _series(sqlite_db, uid[name])
        assert series.state == SeriesState.ROUTED, name
        assert jobs_of(sqlite_db, uid[name]) == [], name
        assert outcomes[uid[name]].skipped == series.skip_reason, name
        assert series.skip_reason is not None and words in series.skip_reason, name
        ev = _skipped_event(sqlite_db, uid[name])
        assert (ev.details["kind"], ev.details["reason"]) == (kind, series.skip_reason), name
        assert ev.details["rules"] == ["abdomen-ct@v1"], name
        assert events(sqlite_db, uid[name])[-2:] == ["series.completed", "series.skipped"], name
    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)
                        .where(Job.state == JobState.FAILED)) == 0
    assert route_series(svc) == []  # routed: never looked at again


def test_a_rule_that_names_the_non_image_value_routes_it_on_purpose(
        sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore)
    add_rule(sqlite_db, "Modality=CT")  # an ordinary rule: never routes a screenshot
    add_rule(sqlite_db, f"SOPClassUID={SC_CLASS}", name="summaries", pipeline="ocr")
    add_rule(sqlite_db, "ImageType~LOCALIZER", name="scouts", pipeline="scout-qa")
    add_rule(sqlite_db, "ImageType=AXIAL", name="axial", pipeline="pancreas-ct")
    sc = add_series(sqlite_db, 1, Modality="CT", SOPClassUID=SC_CLASS)
    scout = add_series(sqlite_db, 2, Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER",
                                                               "AXIAL"])
    derived = add_series(sqlite_db, 3, Modality="CT", ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    own_sr = add_series(sqlite_db, 4, Modality="SR", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.34")
    outcomes = {o.series_uid: o for o in route_series(svc)}
    assert [j.rule_key for j in jobs_of(sqlite_db, sc)] == ["summaries@v1"]
    assert [j.rule_key for j in jobs_of(sqlite_db, scout)] == ["scouts@v1"]
    assert outcomes[sc].skipped is None and _series(sqlite_db, sc).skip_reason is None
    with sqlite_db.session() as s:
        routed = s.scalars(select(AuditEvent).where(AuditEvent.series_uid == scout,
                                                    AuditEvent.event == "series.routed")).one()
    # the rules it was held back from are on record with the reason
    assert sorted(routed.details["rules_skipped"]) == ["abdomen-ct@v1", "axial@v1"]
    assert routed.details["not_an_image"]["kind"] == "localizer"
    # ImageType=AXIAL names a value the derived series has, not the one that makes it derived
    assert jobs_of(sqlite_db, derived) == [] and outcomes[derived].skipped is not None
    assert _skipped_event(sqlite_db, derived).details["rules"] == ["abdomen-ct@v1", "axial@v1"]
    # a result object (this node's own SR class) matched by no rule is simply unrouted
    assert jobs_of(sqlite_db, own_sr) == [] and "series.unrouted" in events(sqlite_db, own_sr)


def test_a_localizer_first_in_a_series_of_images_does_not_skip_it(
        sqlite_db: Database, filestore: FileStore) -> None:
    """The stored attributes are the first instance's; a scout sent first in an axial series
    must not hide the series from its pipeline (the volume loader drops the scout)."""
    src = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[:3]
    uid = f"{ROOT}.6.1"
    scout = _variant(src[0], uid, 1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _ingest(sqlite_db, filestore, [scout, *(_variant(f, uid, k) for k, f in
                                            enumerate(src[1:], 2))])
    only_scouts = f"{ROOT}.6.2"
    _ingest(sqlite_db, filestore, [_variant(f, only_scouts, k, ImageType="LOCALIZER")
                                   for k, f in enumerate(src[:2], 1)])
    assert _series(sqlite_db, uid).attributes["ImageType"][-1] == "LOCALIZER"
    add_rule(sqlite_db, "Modality=CT")
    svc = services(sqlite_db, filestore)
    later = utcnow() + timedelta(seconds=60)
    close_series(svc, now=later)
    outcomes = {o.series_uid: o for o in route_series(svc, now=later)}
    assert len(outcomes[uid].jobs_created) == 1 and outcomes[uid].skipped is None
    assert outcomes[only_scouts].skipped is not None
    assert jobs_of(sqlite_db, only_scouts) == []
