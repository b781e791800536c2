"""Job creation, transactional claiming, leases and admin actions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import jobs
from storage.db import Database
from storage.errors import InputError, JobNotHeldError
from storage.models import AuditEvent, Job, JobState, RoutingRule, Series, Study, utcnow

UID_ROOT = "1.2.826.0.1.3680043.10.999"


def make_series(db: Database, n: int = 1) -> list[int]:
    ids = []
    with db.session() as s:
        study = Study(study_instance_uid=f"{UID_ROOT}.1")
        s.add(study)
        for i in range(n):
            series = Series(series_instance_uid=f"{UID_ROOT}.2.{i + 1}", study=study,
                            modality="CT")
            s.add(series)
            s.flush()
            ids.append(series.id)
    return ids


def make_rule(db: Database, name: str = "abdomen", version: int = 1,
              priority: int = 0) -> int:
    with db.session() as s:
        rule = RoutingRule(name=name, version=version, pipeline="test-pipeline",
                           priority=priority, conditions=[], destinations=[])
        s.add(rule)
        s.flush()
        return rule.id


def request(db: Database, rule_id: int | None, *, model: str = "m1", priority: int = 0,
            max_attempts: int = 3) -> jobs.JobRequest:
    with db.session() as s:
        rule = s.get(RoutingRule, rule_id) if rule_id is not None else None
    return jobs.JobRequest(pipeline="test-pipeline", model_version=model, rule=rule,
                           priority=priority, max_attempts=max_attempts)


def ensure(db: Database, series_id: int, req: jobs.JobRequest,
           new_generation: bool = False) -> tuple[int, bool]:
    with db.session() as s:
        job, created = jobs.ensure_job(s, s.get_one(Series, series_id), req,
                                       new_generation=new_generation)
        return job.id, created


def test_one_job_per_series_rule_version_and_model(any_db: Database) -> None:
    (sid,) = make_series(any_db)
    rule_v1 = make_rule(any_db)
    first, created = ensure(any_db, sid, request(any_db, rule_v1))
    again, created_again = ensure(any_db, sid, request(any_db, rule_v1))
    assert created and not created_again and again == first
    # A new model version or a new rule version is new work; asking explicitly too.
    other_model, c1 = ensure(any_db, sid, request(any_db, rule_v1, model="m2"))
    rule_v2 = make_rule(any_db, version=2)
    other_rule, c2 = ensure(any_db, sid, request(any_db, rule_v2))
    regen, c3 = ensure(any_db, sid, request(any_db, rule_v1), new_generation=True)
    assert c1 and c2 and c3
    assert len({first, other_model, other_rule, regen}) == 4
    with any_db.session() as s:
        assert s.get_one(Job, regen).generation == 1
        assert s.get_one(Job, first).rule_key == "abdomen@v1"
        events = s.scalars(select(AuditEvent.event).where(AuditEvent.event == "job.created"))
        assert len(list(events)) == 4


def test_claim_order_is_priority_then_age(any_db: Database) -> None:
    sids = make_series(any_db, 3)
    low, urgent, mid = (make_rule(any_db, f"r{p}", priority=p) for p in (0, 10, 5))
    created = [ensure(any_db, sid, request(any_db, rid, priority=p))[0]
               for sid, rid, p in zip(sids, (low, urgent, mid), (0, 10, 5), strict=True)]
    order = [jobs.claim_next(any_db, "w", lease_s=60) for _ in range(4)]
    assert order == [created[1], created[2], created[0], None]
    with any_db.session() as s:
        job = s.get_one(Job, created[1])
        assert job.state == JobState.RUNNING and job.attempts == 1 and job.worker == "w"
        assert job.started_at is not None and job.lease_expires_at is not None


def test_concurrent_claimers_take_each_job_exactly_once(any_db: Database) -> None:
    n_jobs, n_threads = 24, 6
    sids = make_series(any_db, n_jobs)
    rid = make_rule(any_db)
    expected = {ensure(any_db, sid, request(any_db, rid))[0] for sid in sids}
    claims: dict[str, list[int]] = {f"w{i}": [] for i in range(n_threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def claimer(name: str) -> None:
        try:
            start.wait(timeout=30)
            while (job_id := jobs.claim_next(any_db, name, lease_s=60)) is not None:
                claims[name].append(job_id)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    taken = [j for js in claims.values() for j in js]
    assert sorted(taken) == sorted(expected)  # all claimed, none twice
    with any_db.session() as s:
        rows = list(s.scalars(select(Job)))
        assert all(j.state == JobState.RUNNING and j.attempts == 1 for j in rows)
        assert {j.id: j.worker for j in rows} == {
            j: w for w, js in claims.items() for j in js}


def test_expired_lease_is_requeued_then_fails_after_max_attempts(any_db: Database) -> None:
    (sid,) = make_series(any_db)
    job_id, _ = ensure(any_db, sid, request(any_db, make_rule(any_db), max_attempts=2))
    for attempt in (1, 2):
        assert jobs.claim_next(any_db, f"dead-{attempt}", lease_s=0.001) == job_id
        released = jobs.requeue_expired(any_db, now=utcnow() + timedelta(seconds=1))
        assert released == [job_id]
        with any_db.session() as s:
            job = s.get_one(Job, job_id)
            assert job.attempts == attempt
            want = JobState.QUEUED if attempt == 1 else JobState.FAILED
            assert job.state == want and "lease expired" in (job.error or "")
    assert jobs.claim_next(any_db, "w", lease_s=60) is None


def test_live_lease_is_not_requeued_and_renewal_extends_it(any_db: Database) -> None:
    (sid,) = make_series(any_db)
    job_id, _ = ensure(any_db, sid, request(any_db, make_rule(any_db)))
    assert jobs.claim_next(any_db, "w1", lease_s=30) == job_id
    assert jobs.requeue_expired(any_db) == []
    assert jobs.renew_lease(any_db, job_id, "w1", lease_s=3600)
    assert not jobs.renew_lease(any_db, job_id, "someone-else", lease_s=3600)
    with any_db.session() as s:
        lease = s.get_one(Job, job_id).lease_expires_at
        assert lease is not None and lease > utcnow() + timedelta(seconds=3000)


def test_result_from_a_worker_that_lost_the_job_is_refused(any_db: Database) -> None:
    from storage.errors import ConflictError

    (sid,) = make_series(any_db)
    job_id, _ = ensure(any_db, sid, request(any_db, make_rule(any_db)))
    assert jobs.claim_next(any_db, "slow", lease_s=0.001) == job_id
    jobs.requeue_expired(any_db, now=utcnow() + timedelta(seconds=1))
    assert jobs.claim_next(any_db, "fast", lease_s=60) == job_id
    with pytest.raises(ConflictError) as refused, any_db.session() as s:
        jobs.finish_job(s, job_id, "slow")
    assert isinstance(refused.value, JobNotHeldError)  # claimed by another
    with pytest.raises(JobNotHeldError, match="gone"), any_db.session() as s:
        jobs.finish_job(s, job_id + 1000, "slow")
    with any_db.session() as s:
        jobs.finish_job(s, job_id, "fast", note="ok")
    with any_db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.DONE and job.finished_at is not None
        assert job.provenance == {"note": "ok"} and job.attempts == 2


def test_failures_retry_within_budget_and_input_errors_do_not(any_db: Database) -> None:
    sids = make_series(any_db, 2)
    rid = make_rule(any_db)
    transient, _ = ensure(any_db, sids[0], request(any_db, rid, max_attempts=2))
    bad_input, _ = ensure(any_db, sids[1], request(any_db, rid, max_attempts=2))
    assert jobs.claim_next(any_db, "w", lease_s=60) == transient
    assert jobs.fail_job(any_db, transient, "w", stage="infer", error="boom",
                         retryable=True) == JobState.QUEUED
    # Requeued, it keeps its place (oldest first) and is claimed again.
    assert jobs.claim_next(any_db, "w", lease_s=60) == transient
    assert jobs.fail_job(any_db, transient, "w", stage="infer", error="boom again",
                         retryable=True) == JobState.FAILED
    assert jobs.claim_next(any_db, "w", lease_s=60) == bad_input
    assert jobs.fail_job(any_db, bad_input, "w", stage="load", error="3 slices",
                         retryable=False) == JobState.FAILED
    assert jobs.claim_next(any_db, "w", lease_s=60) is None
    with any_db.session() as s:
        job = s.get_one(Job, transient)
        assert (job.stage, job.error, job.attempts) == ("infer", "boom again", 2)
        assert job.finished_at is not None


def test_cancel_and_retry(any_db: Database) -> None:
    (sid,) = make_series(any_db)
    job_id, _ = ensure(any_db, sid, request(any_db, make_rule(any_db)))
    assert jobs.claim_next(any_db, "w", lease_s=60) == job_id
    with any_db.session() as s:
        jobs.cancel_job(s, job_id, actor="admin")
    assert not jobs.renew_lease(any_db, job_id, "w", lease_s=60)  # the worker learns of it
    # Not RUNNING any more is "not held" too: the worker's result and failure are refused.
    with pytest.raises(JobNotHeldError, match="cancelled"), any_db.session() as s:
        jobs.finish_job(s, job_id, "w")
    assert jobs.fail_job(any_db, job_id, "w", stage="infer", error="x", retryable=True) is None
    with pytest.raises(InputError, match="only queued or running"), any_db.session() as s:
        jobs.cancel_job(s, job_id, actor="admin")
    with any_db.session() as s:
        jobs.retry_job(s, job_id, actor="admin")
    with pytest.raises(InputError, match="only failed or cancelled"), any_db.session() as s:
        jobs.retry_job(s, job_id, actor="admin")
    assert jobs.claim_next(any_db, "w2", lease_s=60) == job_id
    with any_db.session() as s:
        assert s.get_one(Job, job_id).attempts == 1
        events = [e.event for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert events[-3:] == ["job.cancelled", "job.retried", "job.started"]


def test_jobs_of_a_dead_local_process_are_recovered_at_once(any_db: Database) -> None:
    import socket
    import subprocess
    import sys

    (sid,) = make_series(any_db)
    job_id, _ = ensure(any_db, sid, request(any_db, make_rule(any_db)))
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=60)
    dead_worker = f"{socket.gethostname()}:{proc.stdout.strip()}:abc"
    assert jobs.claim_next(any_db, dead_worker, lease_s=3600) == job_id
    live_worker = jobs.new_worker_id()  # this process: alive, must not be touched
    (sid2,) = [i for i in make_series_more(any_db)]
    live_job, _ = ensure(any_db, sid2, request(any_db, make_rule(any_db, "other")))
    assert jobs.claim_next(any_db, live_worker, lease_s=3600) == live_job
    assert jobs.recover_dead_local_workers(any_db) == [job_id]
    with any_db.session() as s:
        assert s.get_one(Job, job_id).state == JobState.QUEUED
        assert s.get_one(Job, live_job).state == JobState.RUNNING


def make_series_more(db: Database) -> list[int]:
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        series = Series(series_instance_uid=f"{UID_ROOT}.3.1", study=study, modality="CT")
        s.add(series)
        s.flush()
        return [series.id]


def test_a_not_assessable_job_is_done_with_its_outcome_reason_and_audit_event(
        any_db: Database) -> None:
    """Not assessable is a verdict of a DONE job, not a failure; it is audited on its own."""
    from storage.models import JobOutcome

    sids = make_series(any_db, 2)
    rule = make_rule(any_db)
    ids = [ensure(any_db, sid, request(any_db, rule))[0] for sid in sids]
    for _ in ids:
        assert jobs.claim_next(any_db, "w1", lease_s=60) in ids
    with any_db.session() as s, pytest.raises(ValueError, match="needs the reason"):
        jobs.finish_job(s, ids[0], "w1", outcome=JobOutcome.NOT_ASSESSABLE)
    with any_db.session() as s:
        jobs.finish_job(s, ids[0], "w1", outcome=JobOutcome.NOT_ASSESSABLE,
                        outcome_reason="body part BRAIN is not covered by this model")
        jobs.finish_job(s, ids[1], "w1")
    with any_db.session() as s:
        na, ok = s.get_one(Job, ids[0]), s.get_one(Job, ids[1])
        assert (na.state, na.outcome, na.outcome_reason) == (
            JobState.DONE, JobOutcome.NOT_ASSESSABLE,
            "body part BRAIN is not covered by this model")
        assert (ok.state, ok.outcome, ok.outcome_reason) == (
            JobState.DONE, JobOutcome.ASSESSED, None)
        evs = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "job.not_assessable")))
        assert [(e.job_id, e.details["reason"], e.outcome) for e in evs] == [
            (ids[0], "body part BRAIN is not covered by this model", "warning")]
        assert evs[0].series_uid == f"{UID_ROOT}.2.1"
        done = {e.job_id: e.details["job_outcome"] for e in s.scalars(
            select(AuditEvent).where(AuditEvent.event == "job.done"))}
        assert done == {ids[0]: "not_assessable", ids[1]: "assessed"}


def test_jobs_written_before_0002_keep_a_null_outcome(tmp_path: Path) -> None:
    """Upgrading a database at 0001 keeps its rows; their outcome and skip reason are NULL."""
    import sqlalchemy as sa

    from storage import migrate

    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        migrate.upgrade(db, "0001")
        now = utcnow().isoformat()
        with db.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO studies (id, study_instance_uid, first_received_at, "
                "last_received_at) VALUES (1, '1.2.3', :now, :now)"), {"now": now})
            conn.execute(sa.text(
                "INSERT INTO series (id, series_instance_uid, study_id, state, instance_count, "
                "size_bytes, attributes, first_received_at, last_received_at, reopened_count) "
                "VALUES (1, '1.2.3.4', 1, 'routed', 0, 0, '{}', :now, :now, 0)"), {"now": now})
            conn.execute(sa.text(
                "INSERT INTO jobs (id, series_id, rule_key, pipeline, model_version, generation,"
                " state, priority, shadow, attempts, max_attempts, provenance, created_at) "
                "VALUES (1, 1, 'r@v1', 'p', 'm', 0, 'done', 0, 0, 1, 3, '{}', :now)"),
                {"now": now})
        assert migrate.upgrade(db) == migrate.head_revision()
        with db.session() as s:
            job = s.get_one(Job, 1)
            assert (job.state, job.outcome, job.outcome_reason) == (JobState.DONE, None, None)
            assert s.get_one(Series, 1).skip_reason is None
        migrate.upgrade(db, "head")  # idempotent
    finally:
        db.dispose()
