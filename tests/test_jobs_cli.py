"""``ainode jobs``, ``reprocess``, ``audit export``, ``status`` and ``worker --once``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.cli.status_cmd import percentile
from pipelines import registry
from pipelines.results import AnalysisResult
from storage import jobs as job_store
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    Destination,
    Job,
    JobState,
    Output,
    Series,
    Transfer,
    utcnow,
)
from tests.support.data import sr_texts
from tests.test_rules_cli import Node
from tests.test_worker import ThresholdPipeline, spool_series


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(tmp_path)
    yield n
    n.db.dispose()


def store_of(node: Node) -> FileStore:
    return FileStore(node.config.parent / "data")


def test_reprocess_list_show_cancel_retry(node: Node) -> None:
    series_id = spool_series(node.db, store_of(node))
    with node.db.session() as s:
        uid = s.get_one(Series, series_id).series_instance_uid
    code, out = node.run("reprocess", uid)
    assert code == 2 and "no rule matches" in out
    node.ok("rules", "add", "ct", "--when", "Modality=CT", "--pipeline", "test-threshold",
            "--priority", "5")
    (first,) = node.json("reprocess", uid)
    (second,) = node.json("reprocess", uid, "--rule", "ct")
    assert (first["state"], first["rule"], first["priority"]) == ("queued", "ct@v1", 5)
    assert second["generation"] == first["generation"] + 1  # asked for: a new job each time
    listed = node.json("jobs", "list", "--series", uid)
    assert [j["id"] for j in listed] == [second["id"], first["id"]]
    assert node.json("jobs", "list", "--state", "done") == []
    node.ok("jobs", "cancel", str(first["id"]))
    assert node.json("jobs", "show", str(first["id"]))[0]["state"] == "cancelled"
    code, out = node.run("jobs", "cancel", str(first["id"]))
    assert code == 2 and "only queued or running" in out
    node.ok("jobs", "retry", str(first["id"]))
    assert node.json("jobs", "show", str(first["id"]))[0]["state"] == "queued"
    code, out = node.run("jobs", "retry", str(first["id"]))
    assert code == 2 and "only failed or cancelled" in out
    for args in (["jobs", "show", "999"], ["reprocess", "1.2.3"],
                 ["reprocess", uid, "--rule", "nope"]):
        code, out = node.run(*args)
        assert code == 2, (args, out)


def test_worker_once_runs_the_queue_and_status_reports_it(node: Node) -> None:
    series_id = spool_series(node.db, store_of(node))
    with node.db.session() as s:
        uid = s.get_one(Series, series_id).series_instance_uid
    node.ok("rules", "add", "ct", "--when", "Modality=CT", "--pipeline", "test-threshold",
            "--shadow")
    node.ok("reprocess", uid)
    node.ok("worker", "--once")
    (job,) = node.json("jobs", "list")
    assert job["state"] == "done", job["error"]
    shown = node.json("jobs", "show", str(job["id"]))[0]
    assert {f["kind"] for f in shown["findings"]} == {"patient", "lesion"}
    assert sorted(o["kind"] for o in shown["outputs"]) == ["GSPS", "SEG", "SR"]
    status = node.json("status")[0]
    assert status["queue_depth"] == 0 and status["done"] == 1
    assert status["model_versions"]["test-threshold"] == "threshold-1"
    assert status["last_received_at"] is not None and status["disk_free_mb"] > 0
    assert "queue_depth" in node.ok("status")


def test_status_turnaround_median_and_p95_over_the_last_day(node: Node) -> None:
    series_id = spool_series(node.db, store_of(node))
    now = utcnow()
    with node.db.session() as s:
        series = s.get_one(Series, series_id)
        for i, t in enumerate([10.0, 20.0, 30.0, 40.0, 1000.0]):
            s.add(Job(series=series, rule_key=f"r{i}", pipeline="p", state=JobState.DONE,
                      delivered_at=now, turnaround_s=t))
        s.add(Job(series=series, rule_key="old", pipeline="p", state=JobState.DONE,
                  delivered_at=now - timedelta(days=2), turnaround_s=5000.0))
    status = node.json("status")[0]
    assert status["turnaround_jobs_24h"] == 5
    assert status["turnaround_median_s"] == 30.0
    assert status["turnaround_p95_s"] == pytest.approx(808.0)  # 40 + 0.8 * 960


def test_percentile_matches_numpy() -> None:
    import numpy as np

    values = [3.0, 1.0, 7.5, 2.0, 9.0, 4.0, 4.0]
    for q in (0, 50, 90, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 95) is None


def test_audit_export_jsonl_and_csv(node: Node, tmp_path: Path) -> None:
    node.ok("rules", "add", "ct", "--when", "Modality=CT", "--pipeline", "pancreas-ct")
    node.ok("rules", "disable", "ct")
    lines = node.ok("audit", "export", "--since", "1h", "--format", "jsonl").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["event"] for r in rows] == ["rule.created", "rule.changed"]
    assert rows[1]["details"]["changes"]["enabled"] == [True, False]
    out = tmp_path / "audit.csv"
    node.ok("audit", "export", "--since", "2020-01-01", "--format", "csv", "--event", "rule.*",
            "--output", str(out))
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["event"] for r in table] == ["rule.created", "rule.changed"]
    assert json.loads(table[0]["details"])["rule"] == "ct"
    assert node.ok("audit", "export", "--since", "1h", "--until", "2020-01-01") == ""
    code, out_text = node.run("audit", "export", "--since", "yesterday-ish")
    assert code == 2 and "cannot read time" in out_text
    code, _ = node.run("audit", "export", "--format", "xml")
    assert code == 2


def test_claim_helpers_are_wired_to_the_cli_db(node: Node) -> None:
    # `jobs list` shows a running job's worker and stage as the claim recorded them.
    series_id = spool_series(node.db, store_of(node))
    node.ok("rules", "add", "ct", "--when", "Modality=CT", "--pipeline", "test-threshold")
    with node.db.session() as s:
        uid = s.get_one(Series, series_id).series_instance_uid
    node.ok("reprocess", uid)
    job_id = job_store.claim_next(node.db, "host:1:abc", lease_s=60)
    (job,) = node.json("jobs", "list", "--state", "running")
    assert job["id"] == job_id and job["stage"] == "claimed"
    with node.db.session() as s:
        assert s.scalars(select(Job.worker)).one() == "host:1:abc"


class NotAssessablePipeline(ThresholdPipeline):
    """Says it cannot judge the series, yet still hands back a region, a lesion and a score,
    as a pipeline whose applicability check failed after its models ran may."""

    name = "test-not-assessable"
    REASON = "body part BRAIN is outside this model's upper-abdomen coverage"

    def run(self, volume: object) -> AnalysisResult:
        full = super().run(volume)
        return replace(full, status="not_assessable", reason=self.REASON,
                       summary_text="Organ implausible; lesion 1 p=0.80")


registry.register("test-not-assessable")(NotAssessablePipeline)


def test_a_not_assessable_job_reports_only_its_verdict_and_is_counted(node: Node) -> None:
    """The job is DONE with outcome not_assessable and the reason (jobs list/show, the audit
    log, status); what it sends is one SR saying "Not assessable: <reason>": no SEG, GSPS
    or SC, no lesion or score row, and what the pipeline returned besides is kept in the
    job's provenance."""
    series_id = spool_series(node.db, store_of(node))
    with node.db.session() as s:
        uid = s.get_one(Series, series_id).series_instance_uid
        # a PACS that takes every kind: whatever is not sent was not written
        s.add(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                          accepts=["SEG", "SR", "GSPS", "SC"]))
    node.ok("rules", "add", "ct", "--when", "Modality=CT", "--pipeline", "test-not-assessable",
            "--send-to", "pacs")
    node.ok("reprocess", uid)
    node.ok("worker", "--once")
    (job,) = node.json("jobs", "list")
    reason = NotAssessablePipeline.REASON
    assert (job["state"], job["outcome"], job["outcome_reason"]) == (
        "done", "not_assessable", reason), job["error"]
    assert node.json("jobs", "list", "--outcome", "not_assessable") == [job]
    assert node.json("jobs", "list", "--outcome", "assessed") == []
    table = node.ok("jobs", "list")
    assert "not_assessable" in table
    shown = node.json("jobs", "show", str(job["id"]))[0]
    assert [o["kind"] for o in shown["outputs"]] == ["SR"]
    assert [(f["kind"], f["label"], f["probability"]) for f in shown["findings"]] == [
        ("patient", "not assessable", None)]
    withheld = shown["provenance"]["withheld_not_assessable"]
    assert withheld["segments"] == ["organ", "lesion-1"]
    assert [f["kind"] for f in withheld["findings"]] == ["patient", "lesion"]
    assert shown["provenance"]["summary"] == f"Not assessable: {reason}"
    assert "outcome_reason" in node.ok("jobs", "show", str(job["id"]))

    with node.db.session() as s:
        (out,) = s.scalars(select(Output)).all()
        (transfer,) = s.scalars(select(Transfer)).all()
        assert transfer.output_id == out.id  # the SR still goes to PACS
        ev = s.scalars(select(AuditEvent).where(AuditEvent.event == "job.not_assessable")).one()
        assert (ev.job_id, ev.details["reason"], ev.series_uid) == (job["id"], reason, uid)
    sr = pydicom.dcmread(store_of(node).results / out.path)
    texts = sr_texts(sr)
    assert f"Not assessable: {reason}" in texts
    assert not any("lesion" in t.lower() or "p=0.80" in t for t in texts)

    status = node.json("status")[0]
    assert (status["done"], status["not_assessable"]) == (1, 1)
    assert (status["done_24h"], status["not_assessable_24h"]) == (1, 1)




def test_status_counts_not_assessable_jobs_and_skipped_series_of_the_last_day(
        node: Node) -> None:
    from storage.models import JobOutcome

    series_id = spool_series(node.db, store_of(node))
    now = utcnow()
    with node.db.session() as s:
        series = s.get_one(Series, series_id)
        for i, (outcome, ago) in enumerate([
                (JobOutcome.ASSESSED, 1), (JobOutcome.NOT_ASSESSABLE, 1),
                (JobOutcome.NOT_ASSESSABLE, 1), (JobOutcome.NOT_ASSESSABLE, 72), (None, 1)]):
            s.add(Job(series=series, rule_key=f"r{i}", pipeline="p", state=JobState.DONE,
                      outcome=outcome, outcome_reason=None if outcome != JobOutcome.NOT_ASSESSABLE
                      else "no pancreas", finished_at=now - timedelta(hours=ago)))
        s.add(Job(series=series, rule_key="f", pipeline="p", state=JobState.FAILED,
                  finished_at=now))
        s.add(Series(series_instance_uid="1.2.826.0.1.3680043.10.997.1", study=series.study,
                     modality="CT", state="routed", completed_at=now,
                     skip_reason="a localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)"))
    status = node.json("status")[0]
    assert (status["done"], status["not_assessable"], status["failed"]) == (5, 3, 1)
    assert (status["done_24h"], status["not_assessable_24h"]) == (4, 2)
    assert status["series_skipped_24h"] == 1
    assert "not_assessable_24h" in node.ok("status")
