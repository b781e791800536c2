"""Celery workers against today's database-polling worker: throughput and dispatch latency.

In one run, on one fresh PostgreSQL database and one fresh RabbitMQ vhost,
for each set-up (``ainode worker`` polling the database, 1 and 2 processes;
``ainode worker --celery``, 1 and 2 processes):

* dispatch latency: one job at a time, made ready while the workers are idle
  (a random pause before each, so the polling phase is not in step): the time
  from the job's QUEUED commit (``created_at``) to its claim (``started_at``),
  median and p95;
* throughput: ``--jobs`` jobs made ready at once, jobs per minute from the
  first one ready to the last one done.

The job is CPU-bound (tests/plugins/celery_pipelines ``celery-burn``: a fixed
amount of single-threaded matrix work, calibrated to ``--burn-s`` seconds of
CPU here) on a real 3-slice CT series, with the real load, SR writing and
result commit around it. Celery jobs are published the way the node's
routing publishes them (node.queue.Publisher, job id only).

    make bench-workers            (= .venv/bin/python bench/bench_workers.py)
    .venv/bin/python bench/bench_workers.py --jobs 8 --latency 8 --burn-s 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the calibration measures one thread's work

import argparse
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.config import NodeConfig  # noqa: E402
from node.queue import Publisher, celery_app  # noqa: E402
from node.routing import RuleSpec  # noqa: E402
from node.routing.store import add_rule  # noqa: E402
from storage import jobs as job_store  # noqa: E402
from storage import migrate  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.filestore import FileStore  # noqa: E402
from storage.models import Job, JobState, RoutingRule, Series  # noqa: E402
from tests.plugins import publish  # noqa: E402
from tests.plugins.celery_pipelines import BURN_ENV, burn_cpu  # noqa: E402
from tests.support.services import (  # noqa: E402
    POSTGRES_ADMIN_URL,
    ensure_postgres,
    ensure_rabbitmq,
    rabbitmqctl,
)
from tests.test_worker import spool_series  # noqa: E402

AINODE = [sys.executable, "-m", "node"]
PIPELINE = "celery-burn"


def percentile(values: list[float], q: float) -> float:
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def calibrate(burn_s: float) -> int:
    """Iterations of the burn that take ``burn_s`` of CPU in one thread here."""
    n = 300
    t0 = time.process_time()
    burn_cpu(n)
    per = max(1e-6, (time.process_time() - t0) / n)
    return max(1, int(burn_s / per))


@contextmanager
def engines() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database and RabbitMQ vhost, removed afterwards."""
    if not ensure_postgres() or not ensure_rabbitmq():
        raise SystemExit("PostgreSQL and RabbitMQ must run on 127.0.0.1 (make services)")
    name = f"ainode_bench_{uuid.uuid4().hex[:10]}"
    admin = Database(POSTGRES_ADMIN_URL)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", name
    finally:
        rabbitmqctl("delete_vhost", name)
        with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Bench:
    def __init__(self, tmp: Path, db_url: str, vhost: str, iterations: int) -> None:
        self.tmp = tmp
        self.db = Database(db_url)
        migrate.upgrade(self.db)
        self.store = FileStore(tmp / "data")
        self.raw = {"storage": {"data_dir": str(tmp / "data"), "database_url": db_url,
                                "min_free_mb": 0},
                    "inference": {"device": "cpu", "job_timeout_s": 600},
                    "queue": {"broker_url": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"},
                    "logging": {"level": "INFO"}}
        self.config = NodeConfig(**self.raw)
        self.cfg = tmp / "node.yaml"
        self.cfg.write_text(yaml.safe_dump(self.raw))
        site = tmp / "site"
        publish(site, "ainode-bench-pipelines",
                {"ainode.pipelines": {PIPELINE: "tests.plugins.celery_pipelines:burn"}})
        self.env = {**os.environ, BURN_ENV: str(iterations), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
        self.series_id = spool_series(self.db, self.store)
        with self.db.session() as s:
            add_rule(s, RuleSpec.build("bench", pipeline=PIPELINE, shadow=True),
                     actor="bench", pipelines=[PIPELINE])
        self.publisher = Publisher(celery_app(self.config), self.db, self.config,
                                   queue_of=lambda _: "cpu")

    def make_jobs(self, n: int, celery: bool) -> list[int]:
        """``n`` new jobs committed QUEUED (a new generation each), published if Celery."""
        with self.db.session() as s:
            rule = s.scalars(sa.select(RoutingRule).where(RoutingRule.name == "bench")).one()
            series = s.get_one(Series, self.series_id)
            ids = [job_store.reprocess_job(s, series, job_store.JobRequest(
                pipeline=PIPELINE, model_version=f"{PIPELINE}-1", rule=rule, shadow=True),
                actor="bench").id for _ in range(n)]
        if celery:
            self.publisher.publish(ids, "routed")
        return ids

    def wait(self, ids: list[int], timeout: float = 300) -> list[Job]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.session() as s:
                jobs = list(s.scalars(sa.select(Job).where(Job.id.in_(ids))))
            if all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
                bad = [j.id for j in jobs if j.state != JobState.DONE or j.attempts != 1]
                if bad:
                    raise SystemExit(f"jobs {bad} did not run exactly once: "
                                     f"{[(j.state, j.attempts, j.error) for j in jobs]}")
                return jobs
            time.sleep(0.05)
        raise SystemExit(f"jobs {ids} not done after {timeout:g} s")

    @contextmanager
    def workers(self, celery: bool, n: int) -> Iterator[None]:
        procs = []
        logs = []
        for i in range(n):
            log = self.tmp / f"{'celery' if celery else 'polling'}-{n}-{i}.log"
            args = (["worker", "--celery", "--queues", "cpu", "--concurrency", "1"] if celery
                    else ["worker", "--concurrency", "1"])
            with log.open("wb") as out:
                procs.append(subprocess.Popen([*AINODE, "--config", str(self.cfg), *args],
                                              cwd=REPO, env=self.env, stdout=out,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True))
            logs.append(log)
        mark = " ready." if celery else " slot(s)"
        deadline = time.monotonic() + 300
        try:
            while not all(mark in log.read_text() for log in logs):
                for p, log in zip(procs, logs, strict=True):
                    if p.poll() is not None:
                        raise SystemExit(f"worker exited: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit("workers did not start")
                time.sleep(0.2)
            yield
        finally:  # never leave a worker behind, whatever stopped the measurement
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)

    def measure(self, celery: bool, n: int, jobs: int, latency: int,
                rng: random.Random) -> dict[str, float]:
        with self.workers(celery, n):
            self.wait(self.make_jobs(1, celery))  # warm-up: the pipeline built, imports done
            lat = []
            for _ in range(latency):
                time.sleep(rng.uniform(0.0, 2.0))
                (job,) = self.wait(self.make_jobs(1, celery))
                assert job.started_at is not None
                lat.append((job.started_at - job.created_at).total_seconds())
            ids = self.make_jobs(jobs, celery)
            with self.db.session() as s:
                t0 = min(s.scalars(sa.select(Job.created_at).where(Job.id.in_(ids))))
            done = self.wait(ids)
            t1 = max(j.finished_at for j in done if j.finished_at is not None)
        return {"jobs_per_min": jobs / (t1 - t0).total_seconds() * 60,
                "lat_median": statistics.median(lat), "lat_p95": percentile(lat, 95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8, help="jobs in the throughput phase")
    ap.add_argument("--latency", type=int, default=8, help="jobs in the latency phase")
    ap.add_argument("--burn-s", type=float, default=2.0, help="CPU seconds per job")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--only", default="", help="comma-separated set-ups, e.g. 'celery x2'")
    ap.add_argument("--keep", type=Path, help="keep the worker logs in this folder")
    args = ap.parse_args()
    iterations = calibrate(args.burn_s)
    rng = random.Random(args.seed)
    results: dict[str, dict[str, float]] = {}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    with tempfile.TemporaryDirectory() as tmp, engines() as (db_url, vhost):
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(work, db_url, vhost, iterations)
        for label, celery, n in (("polling x1", False, 1), ("celery x1", True, 1),
                                 ("polling x2", False, 2), ("celery x2", True, 2)):
            if only and label not in only:
                continue
            results[label] = bench.measure(celery, n, args.jobs, args.latency, rng)
            r = results[label]
            print(f"{label:11s} {r['jobs_per_min']:6.1f} jobs/min  latency median "
                  f"{r['lat_median'] * 1000:7.1f} ms  p95 {r['lat_p95'] * 1000:7.1f} ms",
                  flush=True)
        bench.db.dispose()
    print(f"\nmachine: {socket.gethostname()}, {os.cpu_count()} CPU cores; burn {args.burn_s:g} "
          f"CPU s/job ({iterations} iterations); {args.jobs} jobs throughput, "
          f"{args.latency} latency samples")
    print("| set-up | jobs/min | dispatch latency median ms | p95 ms |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['jobs_per_min']:.1f} | {r['lat_median'] * 1000:.1f} | "
              f"{r['lat_p95'] * 1000:.1f} |")
    if len(results) < 4:
        return
    c1, c2, p1 = results["celery x1"], results["celery x2"], results["polling x1"]
    print(f"\nratio dispatch latency median celery/polling (x1): "
          f"{c1['lat_median'] / p1['lat_median']:.3f}")
    print(f"ratio throughput celery x2 / celery x1: {c2['jobs_per_min'] / c1['jobs_per_min']:.2f}")
    print(f"ratio throughput celery x1 / polling x1: "
          f"{c1['jobs_per_min'] / p1['jobs_per_min']:.2f}")


if __name__ == "__main__":
    main()
