"""Job claiming throughput: SQLite (BEGIN IMMEDIATE) vs PostgreSQL (SKIP LOCKED), side by side.

One command: ``.venv/bin/python bench/bench_jobs.py [--jobs 300] [--threads 4] [--runs 3]``.
Each run queues N jobs in a fresh database and lets T threads claim and finish
them; prints claims/s per back end (median of the runs) and the ratio. Every
run also checks that each job was claimed exactly once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import jobs, migrate
from storage.db import Database
from storage.models import Job, RoutingRule, Series, Study
from tests.support.services import POSTGRES_ADMIN_URL, ensure_postgres


def fill(db: Database, n: int) -> None:
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3")
        rule = RoutingRule(name="r", version=1, pipeline="p")
        s.add_all([study, rule])
        s.flush()
        for i in range(n):
            series = Series(series_instance_uid=f"1.2.3.{i}", study=study)
            s.add(series)
            s.flush()
            jobs.ensure_job(s, series, jobs.JobRequest(pipeline="p", model_version="1",
                                                       rule=rule, priority=i % 5))


def drain(db: Database, threads: int) -> tuple[float, list[int]]:
    taken: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job_id := jobs.claim_next(db, name, lease_s=60)) is not None:
            with db.session() as s:
                jobs.finish_job(s, job_id, name)
            with lock:
                taken.append(job_id)

    ts = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, taken


def run(url: str, n: int, threads: int) -> float:
    db = Database(url)
    migrate.upgrade(db)
    fill(db, n)
    elapsed, taken = drain(db, threads)
    assert sorted(taken) == list(range(1, n + 1)), "a job was claimed twice or not at all"
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).where(Job.state == "done")) == n
    db.dispose()
    return n / elapsed


def pg_database() -> tuple[str, Database]:
    admin = Database(POSTGRES_ADMIN_URL)
    name = f"ainode_bench_{uuid.uuid4().hex[:8]}"
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return name, admin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    have_pg = ensure_postgres()
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            results["sqlite"].append(run(f"sqlite:///{tmp}/b.db", args.jobs, args.threads))
        if have_pg:
            name, admin = pg_database()
            try:
                url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
                results["postgresql"].append(run(url, args.jobs, args.threads))
            finally:
                with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    print(f"claim+finish throughput, {args.jobs} jobs, {args.threads} threads, "
          f"median of {args.runs} runs")
    med = {k: statistics.median(v) for k, v in results.items() if v}
    for k, v in med.items():
        print(f"  {k:<11} {v:8.1f} jobs/s   runs: {', '.join(f'{x:.1f}' for x in results[k])}")
    if len(med) == 2:
        print(f"  ratio postgresql/sqlite: {med['postgresql'] / med['sqlite']:.2f}")
    else:
        print("  postgresql: not available (no server on 127.0.0.1:5432)")


if __name__ == "__main__":
    main()
