"""STOW-RS against C-STORE into the same running node, in the same run.

    .venv/bin/python bench/bench_stow.py [--runs 1] [--slices 300]

One ``ainode serve`` (one receiver process, ``web.enabled``, no routing
rules so nothing else runs) receives the synthetic 300-slice 512x512 CT of
bench_ingest (cloned from ../shared/data's ct_phantom_philips with fresh
UIDs) twice per run, each time under new UIDs so neither path takes the
duplicate branch: once with dcmtk ``storescu`` on one association, once as
one STOW-RS request (multipart/related, HTTP/1.1 over loopback, bearer
token) through requests (the transport of dicomweb-client; a bare 150 MB
POST to uvicorn took 5.9 s with httpx's sync client, 0.45 s with requests).
Both paths acknowledge only after the file is fsynced and the row committed
(the same ``Ingestor``). The order alternates between runs; the STOW-RS
time includes reading the files and building the body, as storescu's
includes reading them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_ingest import make_series, send, wait_until_settled  # noqa: E402

from tests.support.data import dicom_series_dir  # noqa: E402
from tests.support.net import free_port, wait_for  # noqa: E402
from tests.support.peers import dcmtk_env, require  # noqa: E402


def stow(url: str, token: str, folder: Path) -> float:
    start = time.perf_counter()
    boundary = "bench-stow-boundary"
    chunks: list[bytes] = []
    for p in sorted(folder.iterdir()):
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                   p.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    r = requests.post(f"{url}/dicomweb/studies", data=b"".join(chunks), timeout=600, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:500]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    source = sorted(dicom_series_dir("ct_phantom_philips").glob("*"))
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as t:
        tmp = Path(t)
        port, web_port = free_port(), free_port()
        cfg = tmp / "node.yaml"
        cfg.write_text(yaml.safe_dump({
            "dicom": {"port": port, "allowed_callers": ["STORESCU", "ECHOSCU"]},
            "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 512},
            "logging": {"level": "WARNING"},
            "web": {"enabled": True, "port": web_port},
        }))
        ainode = [sys.executable, "-m", "node", "--config", str(cfg)]
        proc = subprocess.Popen([*ainode, "serve", "--workers", "1"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_for(lambda: subprocess.run(
                [require("echoscu"), "-aet", "ECHOSCU", "-aec", "AINODE", "127.0.0.1",
                 str(port)], env=dcmtk_env(), capture_output=True).returncode == 0,
                timeout=90, what="node")
            subprocess.run([*ainode, "users", "add", "bench", "--role", "admin",
                            "--generate"], cwd=REPO, check=True, capture_output=True)
            token = subprocess.run([*ainode, "users", "token", "bench"], cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout.strip()
            wait_until_settled(proc.pid)
            url = f"http://127.0.0.1:{web_port}"
            times: dict[str, list[float]] = {"C-STORE (storescu)": [], "STOW-RS (requests)": []}
            for run in range(args.runs):
                order = list(times) if run % 2 == 0 else list(reversed(times))
                for name in order:
                    folder = make_series(tmp / f"{run}-{name[:4]}", args.slices, source)
                    subprocess.run(["sync"], check=False)
                    if name.startswith("C-STORE"):
                        times[name].append(send(port, "AINODE", [folder]))
                    else:
                        times[name].append(stow(url, token, folder))
                    print(f"run {run + 1} {name}: {times[name][-1]:.2f} s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rates = {k: args.slices / statistics.median(v) for k, v in times.items()}
    for k, r in rates.items():
        print(f"{k:20s} {r:7.1f} instances/s (median of {len(times[k])})")
    cstore, stow_rate = rates["C-STORE (storescu)"], rates["STOW-RS (requests)"]
    print(f"STOW-RS / C-STORE = {stow_rate / cstore:.2f}")


if __name__ == "__main__":
    main()
