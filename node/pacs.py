"""A local Orthanc PACS on loopback and a stand-in storage SCP: what `ainode demo` runs against.

Orthanc is a real PACS nobody here wrote; the demo pushes a study through it
exactly as a hospital PACS would. It runs with its own storage under a work
directory, HTTP remote access off (loopback REST only), and TCP_NODELAY=1 (it
uses dcmtk's network layer, where Nagle's algorithm stalls small PDUs and
makes it up to 40x slower than it is).

Only what the demo needs lives here (the launcher, its free ports and bounded
waits); the tests reuse it through tests/support, where the test-only helpers
(waiting for instances in Orthanc, requiring a peer) live.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["LocalStoreSCP", "Orthanc", "dcmtk_env", "find_tool", "free_port", "orthanc",
           "wait_for"]

T = TypeVar("T")


def find_tool(tool: str) -> str | None:
    """Path of a peer program (dcmtk, Orthanc, dicom3tools), or None."""
    sbin = Path("/usr/sbin") / tool
    return shutil.which(tool) or (str(sbin) if sbin.exists() else None)


def dcmtk_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


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
    http_port: int | None = None,
) -> Iterator[Orthanc]:
    """Start a private Orthanc; stop it (SIGTERM, then SIGKILL) on exit.

    ``sync_storage`` keeps Orthanc's default fsync per stored file, the fair
    comparison for a node that fsyncs before acknowledging.
    """
    binary = find_tool("Orthanc")
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed (Debian package: orthanc)")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), http_port or free_port()
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
            [binary, str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True,
        )
    server = Orthanc(aet, dicom_port, http_port, workdir, proc)
    try:
        wait_for(lambda: _wait_http(server.url, proc, log), timeout=60, what="Orthanc to start")
        # With DicomModalitiesInDatabase, Orthanc takes its peers from its database
        # only (the config file's list is ignored): declare them through REST.
        for name, (peer_aet, host, port) in (modalities or {}).items():
            server.add_modality(name, peer_aet, port, host)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class LocalStoreSCP:
    """A minimal storage SCP that files what it receives: the demo's PACS when Orthanc is absent.

    It accepts the storage SOP classes the node sends back (SEG, SR, GSPS, SC)
    and writes each instance under ``folder``; nothing more. It is a stand-in
    for a PACS, not a PACS.
    """

    def __init__(self, folder: Path, *, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self._server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.folder.mkdir(parents=True, exist_ok=True)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
