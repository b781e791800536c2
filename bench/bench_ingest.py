"""Ingest benchmark: dcmtk storescu -> the node, dcmtk storescp and Orthanc, side by side.

    .venv/bin/python bench/bench_ingest.py [--runs 3] [--workers N] [--skip-real]
        [--slices 300] [--only SUBSTRING]    # e.g. --skip-real --only "4 senders"

Every receiver is fresh for every run (new data directory, so no run is a
duplicate of the last) and the three are measured in alternation, each run
starting with another of them, so a noisy neighbour on this shared machine
hits all of them alike; the medians are printed. Dirty pages are flushed
(``sync``) before each measurement, so no receiver pays for the previous
one's unsynced writes. The node acknowledges each instance only after its file is fsynced
and its row committed; Orthanc keeps its default fsync per file; storescp does
not fsync (it is the C++ ceiling, not a fair durability peer). Each server
is sent to once it answers C-ECHO; the node also once its start-up work (the
job thread's torch import) has settled, so the figure is a running node's.

Series: the real CT (ct_phantom_philips, 28 x 512x512, explicit LE) and a
synthetic 300-slice 512x512 CT cloned from it with fresh UIDs, each on one
association and with four concurrent storescu processes (four distinct copies
of the series, so the node never takes its duplicate path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.data import dicom_series_dir  # noqa: E402
from tests.support.net import free_port, wait_for  # noqa: E402
from tests.support.peers import dcmtk_env, orthanc, require  # noqa: E402


def make_series(out: Path, n: int, source: list[Path]) -> Path:
    """n slices cycling through ``source`` with fresh Study/Series/SOP UIDs."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        ds = pydicom.dcmread(source[i % len(source)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return out


def send(port: int, aec: str, dirs: list[Path]) -> float:
    """storescu, one process per directory, all at once; wall seconds until all finish."""
    cmd = [require("storescu"), "-aet", "STORESCU", "-aec", aec, "-R", "+sd"]
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "127.0.0.1", str(port), str(d)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for d in dirs]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_until_settled(pid: int, timeout: float = 60.0) -> None:
    """Until the node's processes use under 20 % of a core over half a second.

    Its job thread imports torch when it starts (seconds of CPU, once per
    process lifetime); the benchmark measures a running node's ingest, not
    that start-up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid, *_children(pid)]
        before = _cpu_s(pids)
        time.sleep(0.5)
        if _cpu_s(pids) - before < 0.1:
            return


@contextmanager
def node_target(tmp: Path, workers: int | None, peak: list[int]) -> Iterator[tuple[int, str]]:
    port = free_port()
    cfg = tmp / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "allowed_callers": ["STORESCU", "ECHOSCU"]},
        "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 512},
        "logging": {"level": "WARNING"},
    }))
    extra = ["--workers", str(workers)] if workers else []
    proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "serve",
                             *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def echo() -> bool:
        if proc.poll() is not None:
            raise RuntimeError("node exited at start-up")
        return subprocess.run([require("echoscu"), "-aet", "ECHOSCU", "-aec", "AINODE",
                               "127.0.0.1", str(port)], env=dcmtk_env(),
                              capture_output=True).returncode == 0

    try:
        wait_for(echo, timeout=90, what="node")
        wait_until_settled(proc.pid)
        yield port, "AINODE"
        pids = [proc.pid, *_children(proc.pid)]
        peak.append(sum(_rss_kb(p) for p in pids))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def storescp_target(tmp: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = tmp / "storescp"
    out.mkdir()
    proc = subprocess.Popen([require("storescp"), "--fork", "+xa", "-aet", "STORESCP", "-od",
                             str(out), str(port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: subprocess.run([require("echoscu"), "127.0.0.1", str(port)],
                                        env=dcmtk_env(), capture_output=True).returncode == 0,
                 timeout=30, what="storescp")
        yield port, "STORESCP"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def orthanc_target(tmp: Path) -> Iterator[tuple[int, str]]:
    with orthanc(tmp / "orthanc", aet="ORTHANC") as server:
        yield server.dicom_port, "ORTHANC"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None,
                    help="receiver processes (default: the node's own default)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    peak: list[int] = []
    try:
        src = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
        cases: list[tuple[str, list[Path]]] = []
        if not args.skip_real:
            cases.append(("real CT 28x512^2, 1 assoc", [make_series(root / "r0", len(src), src)]))
            cases.append(("real CT 28x512^2, 4 senders",
                          [make_series(root / f"r4-{i}", len(src), src) for i in range(4)]))
        cases.append((f"synthetic CT {args.slices}x512^2, 1 assoc",
                      [make_series(root / "s0", args.slices, src)]))
        cases.append((f"synthetic CT {args.slices}x512^2, 4 senders",
                      [make_series(root / f"s4-{i}", args.slices, src) for i in range(4)]))
        cases = [c for c in cases if args.only in c[0]]
        targets: dict[str, Callable[[Path], object]] = {
            "node": lambda t: node_target(t, args.workers, peak),
            "orthanc": orthanc_target,
            "storescp": storescp_target,
        }
        from node.service import default_workers

        workers = args.workers or default_workers()
        print(f"machine: {os.cpu_count()} cores, no GPU; node receiver processes={workers}; "
              f"runs={args.runs} (median), targets alternate within each run")
        header = (f"{'case':40} {'target':9} {'inst/s':>8} {'MB/s':>7}"
                  f" {'node/orthanc':>13} {'node/storescp':>14}")
        print(header)
        for name, dirs in cases:
            n = sum(len(list(d.glob("*.dcm"))) for d in dirs)
            mb = sum(f.stat().st_size for d in dirs for f in d.glob("*.dcm")) / 1e6
            times: dict[str, list[float]] = {t: [] for t in targets}
            order = list(targets)
            for run in range(args.runs):
                # Each run starts with another target, so none always follows the same one.
                k = run % len(order)
                for tname in order[k:] + order[:k]:
                    work = root / f"w-{tname}-{run}-{time.monotonic_ns()}"
                    work.mkdir()
                    with targets[tname](work) as (port, aec):  # type: ignore[attr-defined]
                        # storescp never fsyncs: without this its hundreds of MB would be
                        # written back while the next receiver's fsyncs wait behind them.
                        os.sync()
                        times[tname].append(send(port, aec, dirs))
                    shutil.rmtree(work, ignore_errors=True)
            med = {t: statistics.median(v) for t, v in times.items()}
            rate = {t: n / med[t] for t in med}
            for t in targets:
                ratios = ("", "")
                if t == "node":
                    ratios = (f"{rate['node'] / rate['orthanc']:.2f}",
                              f"{rate['node'] / rate['storescp']:.2f}")
                print(f"{name:40} {t:9} {rate[t]:8.0f} {mb / med[t]:7.1f} "
                      f"{ratios[0]:>13} {ratios[1]:>14}", flush=True)
        if peak:
            print(f"node peak RSS (parent + workers, max over runs): {max(peak) / 1024:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
