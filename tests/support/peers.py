"""Real DICOM peers for tests and benchmarks: dcmtk tools and an Orthanc PACS on loopback.

Both are programs nobody here wrote; the node is tested against them, not
against itself. TCP_NODELAY=1 is set for both (they share dcmtk's network
layer): without it, Nagle's algorithm stalls small PDUs and makes them up to
40x slower than they are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.net import free_port, wait_for

__all__ = ["Orthanc", "dcmtk_env", "orthanc", "orthanc_binary", "require"]


def require(tool: str) -> str:
    """Path of a peer program; fails (not skips) when missing: `make test` installs them."""
    sbin = Path("/usr/sbin") / tool
    path = shutil.which(tool) or (str(sbin) if sbin.exists() else None)
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed; `make test` installs dcmtk, orthanc and dicom3tools "
            "with apt-get when run as root"
        )
    return path


def orthanc_binary() -> str:
    return require("Orthanc")


def dcmtk_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


@dataclass
class Orthanc:
    """A running Orthanc on loopback with its own storage, HTTP remote access off."""

    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any, *, timeout: float = 120) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def put(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Declare a DICOM peer (e.g. the node) that Orthanc may send to and accept from."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def upload(self, path: Path) -> Any:
        return self.post("/instances", path.read_bytes())


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(url + "/system", timeout=2):
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    sync_storage: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> Iterator[Orthanc]:
    """Start a private Orthanc; stop it (SIGTERM, then SIGKILL) on exit.

    ``sync_storage`` keeps Orthanc's default fsync per stored file, the fair
    comparison for a node that fsyncs before acknowledging.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": f"ainode-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "SyncStorageArea": sync_storage,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # loopback HTTP only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomModalitiesInDatabase": True,
        "Plugins": [],
        "LuaScripts": [],
        "StableAge": 2,
        "HttpTimeout": 60,
    }
    config.update(extra_config or {})
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [orthanc_binary(), str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True,
        )
    server = Orthanc(aet, dicom_port, http_port, workdir, proc)
    try:
        wait_for(lambda: _wait_http(server.url, proc, log), timeout=60, what="Orthanc to start")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_instances(server: Orthanc, count: int, timeout: float = 60) -> list[str]:
    """Bounded wait until Orthanc holds at least ``count`` instances."""
    start = time.monotonic()
    return wait_for(
        lambda: (ids if len(ids := server.instances()) >= count else None),
        timeout=timeout, what=f"{count} instances in Orthanc (after {time.monotonic()-start:.0f}s)",
    )
