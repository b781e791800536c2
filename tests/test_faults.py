"""Faults of the parts under the node: the database going away, the disk filling.

The database outage is made with a TCP proxy the test controls between the node
and its own PostgreSQL database (the machine's PostgreSQL server is shared and
is never stopped); the full disk is a size-limited tmpfs the test mounts
(root only; skipped with the reason otherwise). dcmtk's storescu is the sender.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from storage.db import Database
from storage.models import AuditEvent, Instance
from tests.support.data import dicom_series_dir
from tests.support.net import free_port
from tests.support.node import NodeProc, start_node
from tests.support.peers import dcmtk_env, require

pytestmark = [pytest.mark.peers, pytest.mark.slow]


class _Proxy:
    """A TCP forwarder to PostgreSQL that the test can cut (every connection dropped, new
    ones refused) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _storescu(port: int, *files: Path) -> tuple[int, list[str]]:
    """storescu -v of ``files``: (exit code, the status of each store in order)."""
    r = subprocess.run([require("storescu"), "-v", "-aet", "STORESCU", "-aec", "AINODE",
                        "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    return r.returncode, re.findall(r"Received Store Response \(([^)]*)\)", out)


def _spool_matches_rows(node_db: Database, spool: Path) -> int:
    """Every spool file has its row and the recorded hash; returns how many there are."""
    with node_db.session() as s:
        rows = {i.path: i.sha256 for i in s.scalars(sa.select(Instance))}
    files = {p.relative_to(spool).as_posix(): p for p in spool.rglob("*.dcm")
             if not p.relative_to(spool).as_posix().startswith(".")}
    assert set(files) == set(rows), "spool files and rows differ"
    for rel, p in files.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == rows[rel], rel
        pydicom.dcmread(p)  # complete and readable
    return len(rows)


@pytest.fixture
def proxied_pg(postgres_url: str) -> Iterator[tuple[str, _Proxy]]:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    proxy = _Proxy((url.host or "127.0.0.1", url.port or 5432))
    yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.cut()


def test_database_outage_answers_out_of_resources_and_the_node_resumes(
    tmp_path: Path, proxied_pg: tuple[str, _Proxy]
) -> None:
    url, proxy = proxied_pg
    files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
    node = start_node(tmp_path, workers=2, serve_args=("--no-jobs",),
                      extra={"storage": {"data_dir": str(tmp_path / "node-data"),
                                         "min_free_mb": 0, "database_url": url}})
    db = Database(url)
    try:
        rc, statuses = _storescu(node.port, *files[:5])
        assert rc == 0 and statuses == ["Success"] * 5
        proxy.cut()
        rc, statuses = _storescu(node.port, *files[5:15])
        print(f"during the outage: {statuses}")
        # storescu stops a transfer at an Out of Resources status (retry later).
        assert statuses == ["Refused: OutOfResources"], statuses
        assert node.proc.poll() is None  # still up
        # The refused instance's file went with it: nothing in the spool without a row.
        assert len([p for p in (node.data_dir / "spool").rglob("*.dcm")
                    if ".tmp" not in p.parts]) == 5
        proxy.restore()
        # Resumes by itself: the next stores succeed without a restart.
        rc, statuses = _storescu(node.port, *files[5:])
        assert rc == 0 and statuses == ["Success"] * 23, statuses
        assert _spool_matches_rows(db, node.data_dir / "spool") == 28
    finally:
        node.stop()
        db.dispose()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")


def test_disk_filling_during_a_transfer_answers_a700_and_recovers(tmp_path: Path) -> None:
    """The spool on an 8 MB tmpfs, the free-space floor off (so only the write itself can
    notice): the 28 slices of 0.5 MB fill it; the store that meets the full disk gets
    0xA700 (Out of Resources), nothing partial is left, the refusal is audited; once
    space returns (remount at 64 MB) the same transfer completes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    spool = tmp_path / "small"
    _mount_tmpfs(spool, "8m")
    node: NodeProc | None = None
    try:
        node = start_node(tmp_path, workers=1, serve_args=("--no-jobs",), extra={
            "storage": {"data_dir": str(tmp_path / "node-data"), "spool_dir": str(spool),
                        "min_free_mb": 0}})
        files = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
        rc, statuses = _storescu(node.port, *files)
        stored = statuses.count("Success")
        print(f"8 MB spool: {stored} stored, {len(statuses) - stored} refused")
        assert 5 <= stored < 28
        # storescu stops a transfer at an Out of Resources status (retry later).
        assert statuses == ["Success"] * stored + ["Refused: OutOfResources"], statuses
        assert not [p for p in spool.rglob("*") if p.name.startswith(".part-")]
        assert _spool_matches_rows(node.db, spool) == stored
        with node.db.session() as s:
            full = list(s.scalars(sa.select(AuditEvent).where(
                AuditEvent.event == "instance.rejected")))
        # The pre-write check sees most of it coming (low_disk); a write that meets the
        # full disk itself is disk_full (test below). Both are 0xA700.
        assert len(full) == 1 and full[0].details["reason"] in ("low_disk", "disk_full")
        subprocess.run(["mount", "-o", "remount,size=64m", str(spool)], check=True, timeout=30)
        rc, statuses = _storescu(node.port, *files)
        assert rc == 0 and statuses == ["Success"] * 28
        assert _spool_matches_rows(node.db, spool) == 28
    finally:
        if node is not None:
            node.stop()
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=30)


def test_a_write_that_meets_a_full_disk_leaves_nothing_and_is_out_of_space(
    tmp_path: Path, sqlite_db: Database
) -> None:
    """ENOSPC in the middle of the spool write itself (the free-space check passed a moment
    before, as when another writer fills the disk): OutOfSpaceError (0xA700 at the
    receiver), audited as disk_full, no partial or unrecorded file."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    from storage.errors import OutOfSpaceError
    from storage.filestore import FileStore
    from storage.ingest import Ingestor, Peer

    spool = tmp_path / "tiny"
    _mount_tmpfs(spool, "1m")
    try:
        store = FileStore(tmp_path / "data", spool_dir=spool, min_free_mb=0)
        store.check_space = lambda incoming=0: None  # type: ignore[method-assign]
        ingestor = Ingestor(sqlite_db, store)
        try:
            data = sorted(dicom_series_dir("ct_phantom_philips").glob("*.dcm"))
            with pytest.raises(OutOfSpaceError, match="file system is full"):
                for f in data[:3]:
                    ingestor.ingest(f.read_bytes(), transfer_syntax_uid="1.2.840.10008.1.2.1",
                                    peer=Peer("STORESCU", "127.0.0.1"))
        finally:
            ingestor.close()
        assert not [p for p in spool.rglob("*") if p.name.startswith(".part-")]
        assert _spool_matches_rows(sqlite_db, spool) == 1
        with sqlite_db.session() as s:
            reasons = list(s.scalars(sa.select(AuditEvent.details).where(
                AuditEvent.event == "instance.rejected")))
        assert [r["reason"] for r in reasons] == ["disk_full"]
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=30)
