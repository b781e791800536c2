"""Issue 21, in process: what people see in PACS and in the PNGs, and what the admin's
mistakes meet (rule grammar, secrets, late instances, status, tables, send logs)."""

from __future__ import annotations

import io
import logging
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from node import heartbeat, logs
from node.cli.jobs_cmd import send_state
from node.cli.output import shorten_uid
from node.config import NodeConfig, load_config
from node.demo import _job_settled, demo_config
from node.jobs.run import supersession_notes
from node.network.pool import default_workers
from node.orchestration import route_series
from node.routing.conditions import evaluate, parse_condition
from node.secrets import mask_text, mask_tree, mask_url, secrets_of
from pipelines.dicom_out import write_results
from pipelines.dicom_out.common import decoded_pixels, series_description
from pipelines.dicom_out.render import CONTEXT_RGB, FINDING_RGB, compose, layout
from pipelines.pancreas.output import (
    LESION_CONFIDENCE_NAME,
    PATIENT_PROBABILITY_NAME,
    probability_label,
)
from pipelines.results import AlgorithmInfo
from storage import migrate
from storage.db import Database
from storage.errors import ConfigError, InputError, StorageError
from storage.filestore import FileStore
from storage.models import AuditEvent, Job, JobState, Series, SeriesState, TransferState, utcnow
from tests.test_dicom_out_writers import make_result
from tests.test_orchestration import add_rule, add_series, jobs_of, services

# -- the rule grammar ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "says"), [
    ("Modality==CT", "'==' is not an operator; write Modality=CT"),
    ("Modality!==CT", "'!==' is not an operator; write Modality!=CT"),
    ("Modality<3", "Modality is a text attribute (VR CS)"),
    ("SeriesDescription>=2", "SeriesDescription is a text attribute (VR LO)"),
    ("CallingAE<1", "CallingAE is a text attribute"),
    ("SeriesDescripton=abd", "did you mean 'SeriesDescription'?"),
])
def test_rule_mistakes_are_refused_with_the_problem_named(text: str, says: str) -> None:
    with pytest.raises(InputError) as err:
        parse_condition(text)
    assert says in str(err.value)


def test_numeric_comparison_still_works_on_numeric_attributes() -> None:
    for text in ("SliceThickness<=3", "Rows>=256", "SeriesNumber>1"):
        assert parse_condition(text).op in ("<=", ">=", ">")


def test_not_equal_to_alternatives_means_none_of() -> None:
    cond = parse_condition("Modality!=MR|PT")
    assert cond.op == "not_in" and cond.value == ("MR", "PT")
    assert evaluate(cond, {"Modality": "CT"}).matched
    assert not evaluate(cond, {"Modality": "MR"}).matched
    assert not evaluate(cond, {"Modality": "pt"}).matched  # case-insensitive like =A|B
    assert evaluate(cond, {}).matched  # absent: "not equal", as for !=
    # The mirror of any-of, stored and read back as the same condition.
    assert parse_condition(cond.to_text()) == cond
    assert type(cond).from_dict(cond.to_dict()) == cond
    assert evaluate(parse_condition("Modality=MR|PT"), {"Modality": "MR"}).matched


# -- secrets ------------------------------------------------------------------------------


def test_secrets_masked_in_urls_keys_and_text() -> None:
    url = "postgresql://ainode:s3cr%et@db.example:5432/ainode"
    assert mask_url(url) == "postgresql://ainode:***@db.example:5432/ainode"
    assert mask_url("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:***@127.0.0.1:5672//"
    assert mask_url("sqlite:////srv/ainode.db") == "sqlite:////srv/ainode.db"
    assert mask_text('connection "host=db password=hunter22 user=x" failed') \
        == 'connection "host=db password=*** user=x" failed'
    tree = mask_tree({"storage": {"database_url": url}, "broker": {"password": "pw1234"},
                      "dicom": {"tls": {"key_file": "/etc/key.pem"}}})
    assert tree["storage"]["database_url"].endswith(":***@db.example:5432/ainode")
    assert tree["broker"]["password"] == "***"
    assert tree["dicom"]["tls"]["key_file"] == "/etc/key.pem"  # a path, not a secret


def test_every_log_line_masks_the_configured_password(tmp_path: Path) -> None:
    cfg = NodeConfig(storage={"database_url": "postgresql://ainode:Pa55word@db/ainode"})
    secrets = secrets_of(cfg)
    assert "Pa55word" in secrets
    for fmt in (logs.KeyValueFormatter(secrets), logs.JsonFormatter(secrets)):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(fmt)
        log = logging.getLogger("test.secrets")
        log.addHandler(handler)
        log.propagate = False
        try:
            log.error("cannot connect to %s", cfg.storage.database_url,
                      extra={"dsn": "password=Pa55word host=db", "again": "Pa55word"})
            try:
                raise RuntimeError("driver said Pa55word")
            except RuntimeError:
                log.exception("crashed")
        finally:
            log.removeHandler(handler)
        out = stream.getvalue()
        assert "Pa55word" not in out and "***" in out


# -- config: did you mean, YAML line -----------------------------------------------------


def test_unknown_config_key_gets_a_suggestion_and_yaml_error_its_line(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("dicom:\n  ae_tilte: X\ndestinations:\n  - {name: a, ae_title: A, "
                    "host: h, port: 1, acepts: [SR]}\nserie: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(typo)
    text = str(err.value)
    assert "dicom.ae_tilte: unknown key; did you mean 'ae_title'?" in text
    assert "destinations.0.acepts: unknown key; did you mean 'accepts'?" in text
    assert "serie: unknown key; did you mean 'series'?" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: 104\n   ae_title: X\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: line 3, column 12: mapping values"):
        load_config(bad)


# -- the database: unreachable, fresh --------------------------------------------------


def test_unreachable_database_is_one_line_and_serve_waits_with_backoff() -> None:
    db = Database("postgresql://ainode:s3cret@127.0.0.1:1/ainode")
    with pytest.raises(StorageError) as err:
        migrate.current_revision(db)
    text = str(err.value)
    assert "\n" not in text and "s3cret" not in text and "ainode:***@127.0.0.1:1" in text
    assert "Connection refused" in text
    slept: list[float] = []
    clock = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    with pytest.raises(StorageError, match=r"gave up after 20 s; storage\.database_wait_s"):
        migrate.wait_until_reachable(db, 20, sleep=sleep, clock=lambda: clock[0])
    assert slept == [1.0, 2.0, 4.0, 8.0, 5.0]  # doubling, the last cut to the deadline
    db.dispose()


def test_fresh_database_gets_its_schema_an_old_one_a_pointer(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert migrate.ensure_schema(db) == migrate.head_revision()
    assert migrate.ensure_schema(db) is None  # nothing to do the second time
    from alembic import command

    command.downgrade(migrate.alembic_config(db), "0002")  # a node upgraded, its db not
    with pytest.raises(StorageError, match=r"revision 0002, this ainode needs .*ainode db upgrade"):
        migrate.ensure_schema(db)
    db.dispose()


# -- the objects the node writes -----------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_sources() -> list[pydicom.Dataset]:
    from tests.support.data import dicom_series_dir

    files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    return sorted((pydicom.dcmread(f) for f in files),
                  key=lambda d: float(d.ImagePositionPatient[2]))


def _texts(ds: pydicom.Dataset) -> list[str]:
    out = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _numbers(ds: pydicom.Dataset) -> list[tuple[str, float]]:
    out = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                out.append((str(item.ConceptNameCodeSequence[0].CodeMeaning),
                            float(item.MeasuredValueSequence[0].NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_every_object_says_research_use_and_the_sr_names_each_score_once(
        phantom_sources: list[pydicom.Dataset]) -> None:
    report = make_result(phantom_sources)
    report.patient_score = 0.5934985801577568
    objs = {o.kind: o.dataset for o in write_results(report.to_result(), phantom_sources,
                                                     {"SEG", "SR", "GSPS", "SC"})}
    for kind, ds in objs.items():
        assert ds.SeriesDescription.endswith("research, not for diagnosis"), kind
        assert len(ds.SeriesDescription) <= 64
    for kind in ("SEG", "GSPS"):
        assert objs[kind].ContentDescription.startswith("Research use only; not for diagnosis")
    sr = objs["SR"]
    texts = _texts(sr)
    assert any(t.startswith("Research use only; not for diagnosis: research output") for t in texts)
    names = [n for n, _ in _numbers(sr)]
    values = dict(_numbers(sr))
    # One patient-level PDAC probability, one lesion confidence per lesion, each by its name,
    # rounded as people read it, and the same words and value in the impression.
    assert names.count(PATIENT_PROBABILITY_NAME) == 1
    assert names.count(LESION_CONFIDENCE_NAME) == len(report.lesions)
    assert not any(n in ("Probability of cancer", "Probability", "Probability of PDAC")
                   for n in names)
    assert values[PATIENT_PROBABILITY_NAME] == 0.59
    impression = [t for t in texts if t.startswith(PATIENT_PROBABILITY_NAME)]
    assert impression and f"{PATIENT_PROBABILITY_NAME} 0.59" in impression[0]
    assert all(f"{v:.2f}" in " ".join(texts) for n, v in _numbers(sr) if n ==
               LESION_CONFIDENCE_NAME)
    assert probability_label("lesion") == LESION_CONFIDENCE_NAME


def test_series_description_keeps_the_disclaimer_whole() -> None:
    long = AlgorithmInfo(name="ainode a-very-long-pipeline-name-from-a-plugin", version="12.3")
    text = series_description(long, "overlay SC")
    assert len(text) <= 64 and text.endswith(" - research, not for diagnosis")


# -- burned-in text --------------------------------------------------------------------------


@pytest.mark.parametrize("width", [132, 512])
def test_burned_in_text_fits_inside_the_image(width: int) -> None:
    gray = np.full((width, width), 60, np.uint8)
    lesion = np.zeros((width, width), bool)
    lesion[width // 2:width // 2 + width // 10, width - width // 8:width - 2] = True  # at the edge
    gland = np.zeros((width, width), bool)
    gland[width // 3:width // 2 + width // 5, width // 4:width - width // 6] = True
    legend = ["AI OVERLAY - NOT FOR PRIMARY DIAGNOSIS - ainode pancreas-ct "
              "0.5.0-demo/0.4.0-demo/0.1.0-demo #9af074ab4adb",
              "1: neck, 33 mm, conf 1.00", "Patient-level PDAC probability 0.59",
              "Averyveryverylongwordwithoutanyspacesthatmustbesplitacrosslines"]
    key = [(CONTEXT_RGB, "pancreas"), (FINDING_RGB, "lesion")]
    plan = layout(width, width, legend, [(lesion, "1")], key)
    # Measured with the font the image is drawn with.
    assert max(plan.right_edges()) <= width - 1
    assert min(p.x for p in (*plan.legend, *plan.labels)) >= 0
    text = " ".join(p.text for p in plan.legend)
    assert "NOT FOR PRIMARY" in text and "DIAGNOSIS" in text and "0.59" in text
    (number,) = plan.labels
    assert number.text == "1"
    img = np.asarray(compose(gray, [(gland, CONTEXT_RGB), (lesion, FINDING_RGB)], legend,
                             [(lesion, "1")], key))
    # The legend lies on a band below the image: no text over the anatomy, and the
    # outlines keep their pixels exactly (the image keeps its rows and columns).
    assert img.shape == (width + plan.band_height, width, 3)
    assert plan.band_height > 0
    red = np.all(img == FINDING_RGB, axis=-1)
    from scipy import ndimage
    assert np.array_equal(red[:width], lesion & ~ndimage.binary_erosion(lesion))
    assert not red[width:].any()  # the key's swatch is a shade, never an outline pixel
    # The font scales with the image.
    assert plan.font.size > layout(132, 132, legend).font.size or width == 132


def test_undecodable_pixels_are_one_line(phantom_sources: list[pydicom.Dataset]) -> None:
    ds = pydicom.Dataset()
    ds.update(phantom_sources[0])
    ds.file_meta = pydicom.dataset.FileMetaDataset(phantom_sources[0].file_meta)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = b"\x00" * 64  # not a JPEG 2000 code stream
    with pytest.raises(InputError) as err:
        decoded_pixels(ds)
    assert "JPEG 2000" in str(err.value) and "\n" not in str(err.value)


# -- late instances ---------------------------------------------------------------------------


def _finish(db: Database, uid: str) -> None:
    with db.session() as s:
        for job in s.scalars(select(Job).join(Series).where(Series.series_instance_uid == uid)):
            job.state = JobState.DONE


def _grow(db: Database, uid: str, count: int) -> None:
    """What ingest does when instances arrive after routing: more, and complete again."""
    with db.session() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        row.instance_count = count
        row.state = SeriesState.COMPLETE
        row.reopened_count += 1


def test_a_series_that_grows_after_its_job_gets_a_new_job_superseding_it(
        any_db: Database, filestore: FileStore) -> None:
    svc = services(any_db, filestore)
    add_rule(any_db, "Modality=CT")
    uid = add_series(any_db, 1, Modality="CT", instance_count=28)
    route_series(svc)
    (first,) = jobs_of(any_db, uid)
    assert first.series_instance_count == 28
    _finish(any_db, uid)
    _grow(any_db, uid, 30)
    (outcome,) = route_series(svc)
    assert len(outcome.jobs_created) == 1
    new = next(j for j in jobs_of(any_db, uid) if j.id == outcome.jobs_created[0])
    assert (new.supersedes_job_id, new.series_instance_count, new.generation) == (first.id, 30, 1)
    with any_db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.event == "job.superseded")).one()
        assert ev.details["superseded_by"] == new.id and ev.job_id == first.id
        assert (ev.details["instances_before"], ev.details["instances_now"]) == (28, 30)
        (note,) = supersession_notes(s, s.get(Job, new.id), 30)
    assert f"job {first.id}" in note and "28 instances" in note and "30" in note
    # Sent again unchanged: no further job.
    _finish(any_db, uid)
    _grow(any_db, uid, 30)
    (again,) = route_series(svc)
    assert again.jobs_created == () and len(jobs_of(any_db, uid)) == 2


def test_growth_while_queued_reuses_the_job_and_the_switch_turns_it_off(
        sqlite_db: Database, filestore: FileStore) -> None:
    svc = services(sqlite_db, filestore)
    add_rule(sqlite_db, "Modality=CT")
    uid = add_series(sqlite_db, 1, Modality="CT", instance_count=10)
    route_series(svc)
    _grow(sqlite_db, uid, 12)  # the job has not run yet: it will read all 12
    (o,) = route_series(svc)
    assert o.jobs_created == () and [j.series_instance_count for j in jobs_of(sqlite_db, uid)] \
        == [12]
    _finish(sqlite_db, uid)
    svc.config.series.rerun_on_growth = False
    _grow(sqlite_db, uid, 14)
    (o,) = route_series(svc)
    assert o.jobs_created == () and len(jobs_of(sqlite_db, uid)) == 1
    with sqlite_db.session() as s:
        assert s.scalars(select(AuditEvent.event).where(
            AuditEvent.event == "series.grown_not_rerun")).one()


def test_sr_says_what_it_supersedes(phantom_sources: list[pydicom.Dataset]) -> None:
    from dataclasses import replace

    result = replace(make_result(phantom_sources).to_result(),
                     notes=("Supersedes the earlier result of this series (job 7).",))
    (sr,) = [o.dataset for o in write_results(result, phantom_sources, {"SR"})]
    assert "Supersedes the earlier result of this series (job 7)." in _texts(sr)


# -- status -----------------------------------------------------------------------------------


def test_status_tells_up_from_stopped_and_silent(sqlite_db: Database) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with sqlite_db.session() as s:
            assert not heartbeat.node_state(s, "127.0.0.1", port).up  # never ran
        heartbeat.beat(sqlite_db, port=port, receivers=2, run_jobs=True)
        with sqlite_db.session() as s:
            st = heartbeat.node_state(s, "127.0.0.1", 1)
        assert st.up and st.summary.startswith(f"up: receivers listening on 127.0.0.1:{port}")
        with sqlite_db.session() as s:
            later = heartbeat.node_state(s, "127.0.0.1", 1, now=utcnow() + timedelta(minutes=5))
        assert not later.up and "last scheduler heartbeat" in later.summary
    with sqlite_db.session() as s:  # the port closed, the beat fresh
        assert heartbeat.node_state(s, "127.0.0.1", 1).summary.startswith("degraded")
    heartbeat.stopped(sqlite_db)
    with sqlite_db.session() as s:
        assert heartbeat.node_state(s, "127.0.0.1", 1).summary.startswith("down: stopped at")


# -- tables, send state, small things -----------------------------------------------------------


def test_uids_shortened_in_the_middle_and_send_state_in_one_word() -> None:
    uid = "1.2.826.0.1.3680043.8.498.11377599173405243222247557576376550228"
    short = shorten_uid(uid)
    assert short.startswith("1.2.826.0.") and short.endswith("7576376550228"[-10:])
    assert "…" in short and len(short) < len(uid)
    assert shorten_uid("pancreas-ct") == "pancreas-ct"
    assert send_state([]) == "-"
    assert send_state([TransferState.SENT] * 3) == "sent"
    assert send_state([TransferState.SENT, TransferState.PENDING]) == "pending 1/2"
    assert send_state([TransferState.FAILED, TransferState.PENDING]) == "failed 1/2"


def test_receivers_by_cores_and_no_scheduler_skip_warning(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers() == 2
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert default_workers() == 8
    rec = logging.LogRecord("apscheduler.scheduler", logging.WARNING, "", 0,
                            'Execution of job "x" skipped: maximum number of running instances '
                            "reached (1)", None, None)
    assert not logs.SchedulerSkipFilter().filter(rec)


# -- the demo -------------------------------------------------------------------------------------


def test_demo_runs_in_its_own_emptied_data_dir_and_reports_its_own_job(
        tmp_path: Path) -> None:
    cfg = NodeConfig(storage={"data_dir": tmp_path / "data",
                              "database_url": "postgresql://x:y@db/ainode"},
                     destinations=[{"name": "pacs", "ae_title": "PACS", "host": "h",
                                    "port": 104}],
                     queue={"broker_url": "amqp://u:p@mq:5672/ainode"})
    work = tmp_path / "data" / "demo"
    first = demo_config(cfg, work)
    assert first.storage.data_dir == work / "node" and first.destinations == []
    assert first.queue.broker_url is None  # the demo runs its job itself, no broker
    assert first.storage.effective_database_url.startswith("sqlite:///")
    (work / "node" / "left-over").write_text("from an earlier run")
    demo_config(cfg, work)
    assert not (work / "node" / "left-over").exists()
    # The node's own database is untouched by the demo's rule and destination.
    db = Database(first.storage.effective_database_url)
    migrate.upgrade(db)
    uid = "1.2.3.4"
    with db.session() as s:
        from storage.models import Study
        st = Study(study_instance_uid="1.2.3")
        ser = Series(series_instance_uid=uid, study=st, state=SeriesState.ROUTED)
        s.add_all([st, ser, Job(series=ser, pipeline="p", state=JobState.DONE,
                                created_at=utcnow() - timedelta(hours=1))])
    svc = type("S", (), {"db": db})()
    assert _job_settled(svc, uid) is not None  # an earlier run's job...
    assert _job_settled(svc, uid, since=utcnow()) is None  # ...is never this run's
    db.dispose()


def test_demo_prints_ground_truth_measured_as_the_node_measures(tmp_path: Path) -> None:
    from node.demo import demo_series
    from pipelines.pancreas.measures import long_axis_diameter_mm
    from pipelines.phantom.generator import PhantomSpec, generate

    said: list[str] = []
    demo_series(tmp_path / "in", said.append)
    phantom = generate(PhantomSpec(seed=424242, contrast="ct", diagnosis="PDAC",
                                   lesion_diameter_mm=24.0))
    truth = long_axis_diameter_mm(phantom.label == 2, phantom.spacing)
    assert f"ground-truth long axis {truth:.0f} mm" in said[0]
    assert f"{truth:.0f}" != "24"  # the asked-for size is not what lies in the image


def test_config_show_masks(tmp_path: Path) -> None:
    cfg = NodeConfig(storage={"database_url": "postgresql://ainode:s3cret@db/ainode"})
    dump = mask_tree(cfg.model_dump(mode="json"))
    assert "s3cret" not in str(dump)


def test_status_lists_the_last_errors_newest_first(sqlite_db: Database) -> None:
    from node.cli.status_cmd import last_errors
    from storage.audit import audit

    with sqlite_db.session() as s:
        audit(s, "transfer.retry", outcome="failure", actor="sender", job_id=3,
              error="pacs: connection refused")
        audit(s, "job.failed", outcome="failure", actor="worker", job_id=4,
              error="InputError: series has 2 slices")
        audit(s, "job.created", actor="scheduler", job_id=5)
    with sqlite_db.session() as s:
        lines = last_errors(s)
    assert len(lines) == 2
    assert lines[0].endswith("job.failed job 4: InputError: series has 2 slices")
    assert lines[1].endswith("transfer.retry job 3: pacs: connection refused")


def test_highdicom_warnings_quoting_header_values_stay_out_of_the_log() -> None:
    import warnings

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        logs.configure("INFO")
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit('The string "DOE" is unlikely to represent the intended '
                                   "person name", UserWarning, "base.py", 1,
                                   module="highdicom.base")
            warnings.warn_explicit("elsewhere", UserWarning, "x.py", 1, module="node.x")
        assert [str(w.message) for w in seen] == ["elsewhere"]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def test_jobs_show_names_and_rounds_each_score_as_the_sr_does(
        sqlite_db: Database, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from node.findings import finding_rows
    from pipelines.pancreas.output import Lesion, PancreasReport
    from storage.models import Study

    mask = np.zeros((2, 4, 4), bool)
    mask[0, 1, 1] = True
    report = PancreasReport("pancreas-ct", AlgorithmInfo("ainode pancreas-ct", "1"), ["1", "2"],
                            0.5934985801577568, True, mask, None,
                            [Lesion(1, mask, 0.99971, 33.0, 1.2, (1.0, 2.0, 3.0), "neck")])
    with sqlite_db.session() as s:
        st = Study(study_instance_uid="1.2.3")
        ser = Series(series_instance_uid="1.2.3.4", study=st)
        job = Job(series=ser, pipeline="pancreas-ct", state=JobState.DONE)
        s.add_all([st, ser, job])
        s.flush()
        s.add_all(finding_rows(job.id, report.to_result()))
    monkeypatch.setenv("AINODE_STORAGE__DATA_DIR", str(data_dir))
    monkeypatch.setenv("COLUMNS", "160")
    out = CliRunner().invoke(app, ["jobs", "show", "1"]).output
    assert "Patient-level PDAC probability" in out and "0.59" in out
    assert "Lesion confidence" in out and "1.0" in out
    assert "0.5934985801577568" not in out and "0.99971" not in out
