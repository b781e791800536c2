"""Celery dispatch against the real engines: RabbitMQ, Redis, PostgreSQL, dcmtk.

One node (``ainode serve`` with ``queue.broker_url``) on a fresh PostgreSQL
database and its own RabbitMQ vhost, three ``ainode worker --celery``
processes, a dcmtk ``storescp`` as the destination, series sent with dcmtk
``storescu``. The pipelines are tests/plugins/celery_pipelines (no model: the
point is dispatch, not inference). Exactly once is counted twice: result rows
and transfers in the database, and files at the receiving storescp.

The scenarios share the cluster (starting it is most of the cost on two
cores) and run in file order; each one checks only its own series.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from pydicom.uid import generate_uid

from node.config import NodeConfig
from node.queue import Publisher, celery_app, message_priority
from node.routing import RuleSpec
from node.routing.store import add_rule
from storage import jobs as job_store
from storage import migrate
from storage.db import Database
from storage.filestore import FileStore
from storage.models import (
    AuditEvent,
    Job,
    JobState,
    Output,
    Series,
    Transfer,
    TransferState,
    WorkerState,
)
from tests.plugins import publish
from tests.plugins.celery_pipelines import SLOW_ENV
from tests.support.data import dicom_series_dir
from tests.support.net import wait_for
from tests.support.node import AINODE, REPO, NodeProc, start_node
from tests.support.peers import dcmtk_env, require, store_scp
from tests.support.services import (
    POSTGRES_ADMIN_URL,
    ensure_rabbitmq,
    ensure_redis,
    rabbitmqctl,
)

pytestmark = [pytest.mark.peers, pytest.mark.postgres, pytest.mark.slow]

PIPELINES = {"celery-tiny": "tests.plugins.celery_pipelines:tiny",
             "celery-slow": "tests.plugins.celery_pipelines:slow",
             "celery-gpu": "tests.plugins.celery_pipelines:gpu"}
SINK_AET = "SINK"
LEASE_S = 6.0
GRACE_S = 4.0


# -- the engines --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this module's own: queues nobody else sees or purges."""
    if not ensure_rabbitmq():
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672 and could not be started")
    name = f"ainode_test_{uuid.uuid4().hex[:10]}"
    assert rabbitmqctl("add_vhost", name).returncode == 0
    assert rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*").returncode == 0
    yield name
    ensure_rabbitmq()  # whatever a test did to the broker, it is back for the next one
    rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
def module_pg(postgres_admin: Database) -> Iterator[str]:
    """One fresh PostgreSQL database for the module's cluster, dropped afterwards."""
    name = f"ainode_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with postgres_admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def queued_messages(vhost: str) -> dict[str, int]:
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready", "--quiet",
                      "--no-table-headers").stdout
    return {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines()) if len(p) == 2}


# -- series ---------------------------------------------------------------------------------


def make_series(folder: Path, description: str, n: int = 3) -> Path:
    """``n`` adjacent slices of a real CT as a new series (new study, series, SOP UIDs)."""
    src = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    slices = sorted((pydicom.dcmread(f) for f in src),
                    key=lambda d: float(d.ImagePositionPatient[2]))[:n]
    out = folder / description.replace(" ", "_")
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for i, ds in enumerate(slices):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
    return out


def storescu(port: int, folders: list[Path]) -> None:
    files = [str(f) for d in folders for f in sorted(d.glob("*.dcm"))]
    r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                        "127.0.0.1", str(port), *files], env=dcmtk_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
               .SeriesInstanceUID)


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    tmp: Path
    node: NodeProc
    db: Database
    config: Path
    broker_url: str
    vhost: str
    sink: Path
    env: dict[str, str]
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*AINODE, "--config", str(self.config), "worker", "--celery",
                                     *args], cwd=REPO, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((proc, log))
        return proc

    def wait_workers_ready(self, procs: list[subprocess.Popen[bytes]]) -> None:
        logs = {p.pid: log for p, log in self.workers}

        def ready() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"worker exited {p.returncode}: "
                                       f"{logs[p.pid].read_text()[-3000:]}")
            return all(" ready." in logs[p.pid].read_text() for p in procs)

        wait_for(ready, timeout=120, what="celery workers ready")

    def jobs_of(self, folders: list[Path]) -> list[Job]:
        uids = [series_uid(f) for f in folders]
        with self.db.session() as s:
            return list(s.scalars(sa.select(Job).join(Series).where(
                Series.series_instance_uid.in_(uids)).order_by(Job.id)))

    def wait_done(self, folders: list[Path], timeout: float) -> list[Job]:
        def done() -> list[Job]:
            jobs = self.jobs_of(folders)
            if len(jobs) == len(folders) and all(j.state == JobState.DONE and j.delivered_at
                                                 for j in jobs):
                return jobs
            return []

        return wait_for(done, timeout=timeout, what=f"{len(folders)} jobs done and delivered")

    def received(self) -> dict[str, int]:
        """At the storescp: received result objects per source series UID."""
        counts: dict[str, int] = {}
        for f in self.sink.rglob("*"):
            if f.is_file():
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                for ref in ds.get("ReferencedSeriesSequence", []) or ds.get(
                        "CurrentRequestedProcedureEvidenceSequence", []):
                    for s in ref.get("ReferencedSeriesSequence", [ref]):
                        uid = str(s.get("SeriesInstanceUID", ""))
                        counts[uid] = counts.get(uid, 0) + 1
        return counts

    def assert_exactly_once(self, folders: list[Path]) -> list[Job]:
        """One result set and one send per job, in the database and at the storescp."""
        jobs = self.jobs_of(folders)
        assert len(jobs) == len(folders)
        with self.db.session() as s:
            for job in jobs:
                outputs = list(s.scalars(sa.select(Output).where(Output.job_id == job.id)))
                assert [o.kind for o in outputs] == ["SR"], job.id
                transfers = list(s.scalars(sa.select(Transfer).where(
                    Transfer.output_id == outputs[0].id)))
                assert [t.state for t in transfers] == [TransferState.SENT]
                done = s.scalar(sa.select(sa.func.count()).select_from(AuditEvent).where(
                    AuditEvent.job_id == job.id, AuditEvent.event == "job.done"))
                assert done == 1
        received = self.received()
        for f in folders:
            assert received.get(series_uid(f)) == 1, (f.name, received)
        return jobs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, vhost: str,
            module_pg: str) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("celery")
    site = tmp / "site"
    publish(site, "ainode-celery-test-pipelines", {"ainode.pipelines": PIPELINES})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        SLOW_ENV: "5", "OMP_NUM_THREADS": "1"}
    broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    data_dir = tmp / "node-data"
    with store_scp(tmp / "sink", SINK_AET) as sink_port:
        extra = {
            "storage": {"data_dir": str(data_dir), "database_url": module_pg,
                        "min_free_mb": 0},
            "inference": {"device": "cpu", "job_timeout_s": 120},
            "queue": {"broker_url": broker, "publish_grace_s": GRACE_S,
                      "sweep_interval_s": 2, "lease_s": LEASE_S},
            "destinations": [{"name": "sink", "ae_title": SINK_AET, "host": "127.0.0.1",
                              "port": sink_port, "accepts": ["SR"]}],
        }
        old = os.environ.copy()
        os.environ.update(env)  # start_node passes the test process' environment on
        try:
            node = start_node(tmp, workers=1, data_dir=data_dir, extra=extra,
                              callers=["STORESCU"], stable_age_s=1.0)
        finally:
            os.environ.clear()
            os.environ.update(old)
        db = Database(module_pg)
        c = Cluster(tmp, node, db, node.config, broker, vhost, tmp / "sink", env)
        try:
            with db.session() as s:
                for name, pipeline, when, prio in (
                        ("tiny", "celery-tiny", "SeriesDescription~^TINY", 0),
                        ("slow", "celery-slow", "SeriesDescription~^SLOW", 0),
                        ("gpu", "celery-gpu", "SeriesDescription~^GPU", 0),
                        ("gpu-urgent", "celery-gpu", "SeriesDescription~^URGENT", 6)):
                    add_rule(s, RuleSpec.build(name, pipeline=pipeline, when=[when],
                                               send_to=["sink"], priority=prio),
                             actor="test", pipelines=list(PIPELINES),
                             configured_destinations=["sink"])
            procs = [c.start_worker("--queues", "cpu", "--concurrency", "1")
                     for _ in range(3)]
            c.wait_workers_ready(procs)
            yield c
        finally:
            for proc, _ in c.workers:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in c.workers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            node.stop()
            db.dispose()


# -- the scenarios --------------------------------------------------------------------------


def test_twelve_jobs_on_three_workers_run_exactly_once(cluster: Cluster) -> None:
    folders = [make_series(cluster.tmp / "twelve", f"TINY {i}") for i in range(12)]
    storescu(cluster.node.port, folders)
    jobs = cluster.wait_done(folders, timeout=150)
    cluster.assert_exactly_once(folders)
    assert all(j.attempts == 1 and j.queue == "cpu" for j in jobs)
    with cluster.db.session() as s:
        started = s.scalar(sa.select(sa.func.count()).select_from(AuditEvent).where(
            AuditEvent.event == "job.started",
            AuditEvent.job_id.in_([j.id for j in jobs])))
        published = s.scalars(sa.select(AuditEvent).where(
            AuditEvent.event == "job.published",
            AuditEvent.job_id.in_([j.id for j in jobs]))).all()
        rows = s.scalars(sa.select(WorkerState).where(WorkerState.kind == "celery")).all()
    assert started == 12
    assert published and {e.details["reason"] for e in published} <= {"routed", "sweep"}
    assert len({j.worker for j in jobs}) >= 2  # the work was spread over the workers
    assert len(rows) == 3 and all(r.device == "cpu" and r.queues == ["cpu"] for r in rows)


def test_a_worker_killed_mid_job_leaves_it_to_another_exactly_once(cluster: Cluster) -> None:
    folder = make_series(cluster.tmp / "kill", "SLOW kill")
    storescu(cluster.node.port, [folder])

    def in_inference() -> Job | None:
        jobs = cluster.jobs_of([folder])
        return jobs[0] if jobs and jobs[0].stage == "infer" else None

    job = wait_for(in_inference, timeout=90, what="the slow job in inference")
    pid = int((job.worker or "").split(":")[1])
    victim = next(p for p, _ in cluster.workers if p.pid == pid)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker process and all it runs
    victim.wait(timeout=30)
    (done,) = cluster.wait_done([folder], timeout=120)
    assert done.attempts == 2 and done.worker != job.worker
    cluster.assert_exactly_once([folder])
    with cluster.db.session() as s:
        events = [e.event for e in s.scalars(sa.select(AuditEvent).where(
            AuditEvent.job_id == job.id,
            AuditEvent.event.in_(["job.started", "job.requeued", "job.done"]))
            .order_by(AuditEvent.id))]
    assert events == ["job.started", "job.requeued", "job.started", "job.done"]
    # The killed worker's unacknowledged message came back from the broker to a survivor,
    # which found the job held under its lease and acknowledged it without running it.
    survivors = "".join(log.read_text() for p, log in cluster.workers if p is not victim)
    assert f'msg="stale or duplicate message: job not claimable" job_id={job.id}' in survivors


def test_a_broker_restart_mid_run_loses_no_job(cluster: Cluster) -> None:
    folders = [make_series(cluster.tmp / "restart", f"SLOW restart {i}") for i in range(3)]
    storescu(cluster.node.port, folders)
    wait_for(lambda: any(j.state == JobState.RUNNING for j in cluster.jobs_of(folders)),
             timeout=90, what="a job running")
    try:
        assert rabbitmqctl("stop_app").returncode == 0
        time.sleep(3)
    finally:
        assert rabbitmqctl("start_app").returncode == 0 or ensure_rabbitmq()
    cluster.wait_done(folders, timeout=150)
    cluster.assert_exactly_once(folders)


def test_a_gpu_job_waits_for_a_gpu_worker_and_a_purged_queue_is_swept(
        cluster: Cluster) -> None:
    normal = [make_series(cluster.tmp / "gpu", f"GPU {i}") for i in range(2)]
    urgent = make_series(cluster.tmp / "gpu", "URGENT 0")
    storescu(cluster.node.port, [*normal, urgent])
    wait_for(lambda: len([j for j in cluster.jobs_of([*normal, urgent])
                          if j.published_at is not None]) == 3,
             timeout=60, what="the gpu jobs published")
    time.sleep(GRACE_S + 4)  # past the grace period: the sweep sees them and leaves them
    jobs = cluster.jobs_of([*normal, urgent])
    assert all(j.state == JobState.QUEUED and j.attempts == 0 and j.queue == "gpu"
               for j in jobs), [(j.state, j.queue) for j in jobs]
    assert queued_messages(cluster.vhost).get("gpu") == 3  # waiting, not duplicated
    shown = cluster.node.ainode("jobs", "list", "--state", "queued", "--json")
    assert shown.returncode == 0, shown.stderr
    waiting = {r["id"]: r["waiting"] for r in yaml.safe_load(shown.stdout)}
    assert all("no live worker" in waiting[j.id] and "gpu" in waiting[j.id] for j in jobs)
    table = cluster.node.ainode("jobs", "list", "--state", "queued").stdout
    assert "no live worker for queue gpu" in table and "workers" in table
    status = cluster.node.ainode("status", "--json")
    info = yaml.safe_load(status.stdout)[0]
    assert info["queued_without_worker"] == {"gpu": 3}
    live = [w for w in info["workers"] if w["live"] and w["kind"] == "celery"]
    assert live and all(w["queues"] == "cpu" and w["device"] == "cpu" for w in live)

    # The broker loses the messages; the rows still say queued, so the sweep publishes again.
    assert rabbitmqctl("purge_queue", "-p", cluster.vhost, "gpu").returncode == 0

    def swept() -> bool:
        with cluster.db.session() as s:
            events = s.scalars(sa.select(AuditEvent).where(
                AuditEvent.event == "queue.sweep")).all()
        return {j.id for j in jobs} <= {i for e in events for i in e.details["jobs"]}

    wait_for(swept, timeout=30, what="the sweep to re-publish the purged jobs")
    # A (fake) GPU worker, one job at a time: the urgent rule's job goes first.
    gpu = cluster.start_worker("--queues", "gpu", "--device", "cuda:0", "--concurrency", "1")
    cluster.wait_workers_ready([gpu])
    done = cluster.wait_done([*normal, urgent], timeout=120)
    cluster.assert_exactly_once([*normal, urgent])
    assert all(j.provenance["device"] == "cuda:0" and j.attempts == 1 for j in done)
    first = min(done, key=lambda j: j.started_at or j.created_at)
    assert first.id == cluster.jobs_of([urgent])[0].id


# -- start-up refusals and Redis (no cluster) ---------------------------------------------


def test_a_broker_limit_below_the_job_time_limit_is_refused(tmp_path: Path) -> None:
    """The CLI's face of it (tests/test_queue_config.py has the rule itself)."""
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path)},
                                   "queue": {"broker_url": "amqp://127.0.0.1:5672//"}}))
    r = subprocess.run([*AINODE, "--config", str(cfg), "worker", "--celery"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ainode: error: RabbitMQ's "
                                                        "consumer_timeout")


def test_redis_broker_runs_jobs_by_priority(tmp_path: Path, postgres_url: str) -> None:
    """Redis as the broker: the same task, urgent first (its priority scale is reversed)."""
    if not ensure_redis():
        pytest.fail("Redis is not running on 127.0.0.1:6379 and could not be started")
    from tests.test_worker import spool_series

    db = Database(postgres_url)
    migrate.upgrade(db)
    store = FileStore(tmp_path / "data")
    series_id = spool_series(db, store)
    site = tmp_path / "site"
    publish(site, "ainode-celery-test-pipelines", {"ainode.pipelines": PIPELINES})
    queue = f"cpu-{uuid.uuid4().hex[:8]}"  # this test's own Redis queue
    raw = {"storage": {"data_dir": str(tmp_path / "data"), "database_url": postgres_url,
                       "min_free_mb": 0},
           "inference": {"device": "cpu", "job_timeout_s": 120},
           "queue": {"broker_url": "redis://127.0.0.1:6379/15",
                     "pipeline_queues": {"celery-tiny": queue}}}
    config = NodeConfig(**raw)
    with db.session() as s:
        ids = []
        for name, prio in (("n1", 0), ("n2", 0), ("urgent", 6)):
            rule = add_rule(s, RuleSpec.build(name, pipeline="celery-tiny", priority=prio,
                                              shadow=True),
                            actor="test", pipelines=list(PIPELINES))
            job, _ = job_store.ensure_job(s, s.get_one(Series, series_id), job_store.JobRequest(
                pipeline="celery-tiny", model_version="celery-tiny-1", rule=rule,
                priority=prio, shadow=True))
            ids.append(job.id)
    app = celery_app(config)
    published = Publisher(app, db, config).publish(ids, "routed")
    assert published == sorted(ids)
    assert message_priority(6, "redis") < message_priority(0, "redis")  # 0 runs first there
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*AINODE, "--config", str(cfg), "worker", "--celery",
                                 "--queues", queue, "--concurrency", "1"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def done() -> list[Job]:
            with db.session() as s:
                jobs = list(s.scalars(sa.select(Job).where(Job.id.in_(ids))))
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            return jobs if all(j.state == JobState.DONE for j in jobs) else []

        jobs = wait_for(done, timeout=120, what="the Redis-dispatched jobs done")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    order = [j.id for j in sorted(jobs, key=lambda j: j.started_at or j.created_at)]
    assert order[0] == ids[2]  # the urgent rule's job, published last, ran first
    assert all(j.attempts == 1 for j in jobs)
    with db.session() as s:
        per_job = {i: s.scalar(sa.select(sa.func.count()).select_from(Output).where(
            Output.job_id == i)) for i in ids}
        done_events = s.scalar(sa.select(sa.func.count()).select_from(AuditEvent).where(
            AuditEvent.event == "job.done", AuditEvent.job_id.in_(ids)))
    assert done_events == 3 and len(set(per_job.values())) == 1 and per_job[ids[0]] >= 1
    db.dispose()


def test_a_claim_waits_for_a_locked_row_instead_of_dropping_the_message(
        tmp_path: Path, postgres_url: str) -> None:
    """The row lock of whoever touches the job (the publisher stamping it, a second
    claimer) must delay a claim, not make a good message look stale."""
    import threading

    from tests.test_worker import queue_job, spool_series

    db = Database(postgres_url)
    migrate.upgrade(db)
    job_id = queue_job(db, spool_series(db, FileStore(tmp_path / "data")))
    result: list[bool] = []
    with db.session() as s:
        s.execute(sa.select(Job).where(Job.id == job_id).with_for_update()).one()
        claimer = threading.Thread(target=lambda: result.append(
            job_store.claim_job(db, job_id, "w1", lease_s=30)))
        claimer.start()
        time.sleep(1.0)
        assert claimer.is_alive() and not result  # waiting on the lock, not skipping
    claimer.join(timeout=30)
    assert result == [True]
    assert job_store.claim_job(db, job_id, "w2", lease_s=30) is False  # now it is held
    db.dispose()


def test_a_publish_the_broker_refuses_is_left_to_the_sweep(
        tmp_path: Path, postgres_url: str) -> None:
    from tests.support.net import free_port
    from tests.test_worker import queue_job, spool_series

    db = Database(postgres_url)
    migrate.upgrade(db)
    job_id = queue_job(db, spool_series(db, FileStore(tmp_path / "data")))
    config = NodeConfig(storage={"data_dir": tmp_path},
                        queue={"broker_url": f"amqp://guest:guest@127.0.0.1:{free_port()}//"})
    publisher = Publisher(celery_app(config), db, config, queue_of=lambda _: "cpu")
    assert publisher.publish([job_id], "routed") == []
    with db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.QUEUED and job.published_at is None  # the sweep's now
        events = [e.event for e in s.scalars(sa.select(AuditEvent).order_by(AuditEvent.id))]
    assert events[-2:] == ["job.published", "job.publish_failed"]
    db.dispose()


def test_a_polling_worker_reports_its_state_too(tmp_path: Path) -> None:
    """``ainode worker`` (no broker) keeps a row as a Celery worker does: its current job
    while it runs one, and ``stopped`` after SIGTERM."""
    from tests.test_worker import queue_job, spool_series

    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'ainode.db'}")
    migrate.upgrade(db)
    job_id = queue_job(db, spool_series(db, FileStore(data)), "celery-slow")
    site = tmp_path / "site"
    publish(site, "ainode-celery-test-pipelines", {"ainode.pipelines": PIPELINES})
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"data_dir": str(data), "min_free_mb": 0},
                                   "inference": {"device": "cpu"}}))
    env = {**os.environ, SLOW_ENV: "4", "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = subprocess.Popen([*AINODE, "--config", str(cfg), "worker", "--poll", "0.5"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def running() -> WorkerState | None:
            with db.session() as s:
                row = s.scalars(sa.select(WorkerState)).first()
            return row if row is not None and row.current_job_id == job_id else None

        row = wait_for(running, timeout=90, what="the polling worker's row naming its job")
        assert row.kind == "polling" and row.state == "running" and row.device == "cpu"
        assert row.pid == proc.pid
        wait_for(lambda: job_done(db, job_id), timeout=60, what="the job done")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    with db.session() as s:
        row = s.scalars(sa.select(WorkerState)).one()
        assert row.state == "stopped" and row.current_job_id is None
    db.dispose()


def job_done(db: Database, job_id: int) -> bool:
    with db.session() as s:
        return s.get_one(Job, job_id).state == JobState.DONE
