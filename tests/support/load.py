"""Load on a live node: concurrent storescu senders of a CT series while a job runs.

Each sender is dcmtk's storescu (``-v``, line-buffered) sending its own copy of
a CT series (the Philips phantom slice cloned with fresh UIDs); the time from
each "Sending Store Request" line to its "Received Store Response" line is one
C-STORE's latency as the sender sees it. The node's RSS (main and receiver
processes) is sampled every half second. A phantom study matched by a routing
rule starts a pancreas job first, so the receivers share the machine with it.

``python -m tests.support.load --seconds 1800 --senders 8 --slices 300``
(``make soak``) repeats rounds for that long; ``tests/test_load.py`` runs one
small round. Each round is checked as it ends (every acknowledged instance has
its row) and then purged by the node's own retention step
(``node.orchestration.clean_spool``), and the senders' folders are re-stamped
in place: a round writes 8 x 150 MB, and a soak that kept them all filled a
75 GB disk in nine minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import sqlalchemy as sa
from pydicom.uid import generate_uid

from storage.models import Instance, Job, JobState
from tests.support.data import dicom_series_dir
from tests.support.fuzz import node_rss_mb
from tests.support.net import wait_for
from tests.support.node import NodeProc, start_node
from tests.support.peers import dcmtk_env, require

__all__ = ["LoadReport", "clone_ct", "load_round", "start_job", "start_load_node"]


@dataclass
class LoadReport:
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    sent: int = 0
    acknowledged: int = 0
    failed_senders: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")

    def summary(self) -> str:
        return (f"{self.acknowledged}/{self.sent} acknowledged in {self.seconds:.1f} s; "
                f"C-STORE latency p50 {self.percentile(0.5):.1f} ms, "
                f"p99 {self.percentile(0.99):.1f} ms, "
                f"mean {statistics.fmean(self.latencies_ms or [0]):.1f} ms; "
                f"node RSS {min(self.rss_mb or [0]):.0f}..{max(self.rss_mb or [0]):.0f} MB")


def clone_ct(out: Path, n: int) -> Path:
    """``n`` slices of the Philips phantom under fresh Study/Series/SOP UIDs (replacing
    what ``out`` held)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = pydicom.dcmread(sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))[0])
    base.StudyInstanceUID, base.SeriesInstanceUID = generate_uid(), generate_uid()
    base.SeriesDescription = "LOAD TEST"
    for i in range(n):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        base.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return out


def start_load_node(tmp: Path, database_url: str | None = None) -> NodeProc:
    return start_node(tmp, workers=2, stable_age_s=2.0, database_url=database_url)


def start_job(node: NodeProc, tmp: Path) -> str:
    """A phantom CT matched by a rule: returns its series UID once its job runs."""
    from pipelines.phantom.generator import PhantomSpec, generate
    from pipelines.phantom.io import write_dicom_series

    add = node.ainode("rules", "add", "phantom-ct", "--when", "SeriesDescription~^Synthetic",
                      "--pipeline", "pancreas-ct")
    assert add.returncode == 0, add.stderr
    files = write_dicom_series(generate(PhantomSpec(seed=1919, contrast="ct")),
                               tmp / "phantom", seed=1919)
    r = subprocess.run([require("storescu"), "-aet", "STORESCU", "-aec", "AINODE",
                        "127.0.0.1", str(node.port), *map(str, files)], env=dcmtk_env(),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def running() -> bool:
        db = node.db
        try:
            with db.session() as s:
                return bool(s.scalar(sa.select(sa.func.count()).select_from(Job).where(
                    Job.state == JobState.RUNNING)))
        finally:
            db.dispose()

    wait_for(running, timeout=300, interval=0.2, what="the phantom's job to run")
    return series


def _sender(port: int, folder: Path, report: LoadReport, lock: threading.Lock) -> None:
    cmd = ["stdbuf", "-oL", "-eL", require("storescu"), "-v", "-aet", "STORESCU",
           "-aec", "AINODE", "+sd", "127.0.0.1", str(port), str(folder)]
    proc = subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    sent_at: float | None = None
    lat: list[float] = []
    sent = acked = 0
    for line in proc.stdout:
        now = time.monotonic()
        if "Sending Store Request" in line:
            sent_at = now
            sent += 1
        elif "Received Store Response" in line and sent_at is not None:
            lat.append((now - sent_at) * 1000)
            if "(Success)" in line:
                acked += 1
            sent_at = None
    proc.wait(timeout=60)
    with lock:
        report.latencies_ms += lat
        report.sent += sent
        report.acknowledged += acked
        report.failed_senders += proc.returncode != 0


def load_round(node: NodeProc, tmp: Path, *, senders: int, slices: int,
               report: LoadReport | None = None) -> LoadReport:
    """One round: ``senders`` storescu processes at once, each its own ``slices``-slice CT
    (in ``tmp/load-<i>``, fresh UIDs each round)."""
    report = report or LoadReport()
    folders = [clone_ct(tmp / f"load-{i}", slices) for i in range(senders)]
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            report.rss_mb.append(node_rss_mb(node.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    threads = [threading.Thread(target=_sender, args=(node.port, f, report, lock))
               for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    report.seconds += time.monotonic() - start
    stop.set()
    sampler.join(timeout=5)
    return report


def landed(node: NodeProc, folders: list[Path]) -> int:
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for d in folders for f in d.glob("*.dcm")}
    db = node.db
    try:
        with db.session() as s:
            return len(set(s.scalars(sa.select(Instance.sop_instance_uid)
                                     .where(Instance.sop_instance_uid.in_(uids)))))
    finally:
        db.dispose()


def series_of(folders: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(next(iter(sorted(d.glob("*.dcm")))),
                                stop_before_pixels=True).SeriesInstanceUID) for d in folders]


def purge(node: NodeProc, series_uids: list[str], *, timeout: float = 120) -> int:
    """Once the node has routed these series, its retention step removes their files.

    The node's own ``clean_spool`` with a retention of a moment: the spool stays
    bounded over a long soak through the code a long-running node relies on,
    which never removes a series with unfinished work.
    """
    from node.config import NodeConfig, StorageConfig
    from node.orchestration import Services, clean_spool
    from storage.filestore import FileStore
    from storage.models import Series, SeriesState

    db = node.db
    try:
        def routed() -> bool:
            with db.session() as s:
                n = s.scalar(sa.select(sa.func.count()).select_from(Series).where(
                    Series.series_instance_uid.in_(series_uids),
                    Series.state == SeriesState.ROUTED))
            return n == len(series_uids)

        wait_for(routed, timeout=timeout, interval=0.5, what="the round's series routed")
        config = NodeConfig(storage=StorageConfig(data_dir=node.data_dir,
                                                  retention_days=1e-9))
        cleaned = clean_spool(Services(config, db, FileStore(node.data_dir)))
        return sum(1 for uid in cleaned if uid in set(series_uids))
    finally:
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="soak a live node for a chosen time")
    parser.add_argument("--seconds", type=float, default=1800)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: a fresh database on the machine's server, "
                             "dropped afterwards (where the commit path differs)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ainode-soak-"))
    with _database(args.database) as database_url:
        return _soak(tmp, args, database_url)


@contextlib.contextmanager
def _database(kind: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    from storage.db import Database
    from tests.support.services import POSTGRES_ADMIN_URL, ensure_postgres, fresh_postgres_database

    if not ensure_postgres():
        raise SystemExit("soak: PostgreSQL is not running and could not be started")
    admin = Database(POSTGRES_ADMIN_URL)
    try:
        with fresh_postgres_database(admin, prefix="ainode_soak") as url:
            yield url
    finally:
        admin.dispose()


def _soak(tmp: Path, args: argparse.Namespace, database_url: str | None) -> int:
    node = start_load_node(tmp, database_url)
    report = LoadReport()
    rounds = recorded = purged = 0
    try:
        start_job(node, tmp)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            load_round(node, tmp, senders=args.senders, slices=args.slices, report=report)
            folders = sorted(tmp.glob("load-*"))
            recorded += landed(node, folders)  # before the purge removes the rows
            purged += purge(node, series_of(folders))
            rounds += 1
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{rounds} rounds of {args.senders} x {args.slices}: {report.summary()}")
    print(f"recorded in the database: {recorded} of {report.acknowledged} acknowledged; "
          f"{purged} series purged by retention after their check")
    lost = report.sent - recorded
    print(f"lost (not acknowledged or not recorded): {lost}; "
          f"failed senders: {report.failed_senders}")
    return 1 if lost or report.failed_senders else 0


if __name__ == "__main__":
    sys.exit(main())
